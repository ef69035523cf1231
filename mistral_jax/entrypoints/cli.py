"""The `mistral-jax` console script: `mistral-jax serve ...`, `mistral-jax generate ...`,
`mistral-jax convert ...` (each the same as `python -m mistral_jax.<command>`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = ("serve", "generate", "convert")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: mistral-jax {{{','.join(COMMANDS)}}} [options]   (--help after a command for its options)",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"mistral_jax.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
