"""`python -m mistral_jax.convert`: the command's name for entrypoints/convert.py."""

import sys

from mistral_jax.entrypoints.convert import main

if __name__ == "__main__":
    sys.exit(main())
