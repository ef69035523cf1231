"""`python -m mistral_jax.convert SRC DST`: any supported checkpoint -> an Orbax checkpoint.

SRC is whatever `LLM(model=...)` opens (Mistral, Hugging Face, FP8 compressed-tensors, GGUF).
DST gets the parameters (checkpoint/orbax.py), the model config, and the tokenizer: Mistral and
Hugging Face tokenizer files are copied; a GGUF file's tokenizer and chat template are written
as tokenizer.json + tokenizer_config.json (+ generation_config.json for its stop tokens).
`LLM(model=DST)` then restores it straight into its mesh, on any number of hosts.
The conversion holds the whole model in this host's (device) memory once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mistral_jax.engine.args import QUANTIZATIONS
from mistral_jax.engine.build import DTYPES
from mistral_jax.loading.checkpoint import GGUFCheckpoint, open_checkpoint
from mistral_jax.loading.checkpoint.orbax import save
from mistral_jax.loading.weights import load_weights
from mistral_jax.tokenizer import HFTokenizer

TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v*", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(checkpoint, dst: Path) -> list[str]:
    """The tokenizer files `load_tokenizer(dst)` needs; returns their names."""
    if isinstance(checkpoint, GGUFCheckpoint):
        HFTokenizer.from_gguf(checkpoint.path).save(dst)
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    src = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    copied = []
    for pattern in TOKENIZER_FILES:
        for f in sorted(src.glob(pattern)):
            shutil.copy(f, dst / f.name)
            copied.append(f.name)
    return copied


def convert(src: str | Path, dst: str | Path, dtype: str = "bfloat16", quantization: str | None = None,
            progress: bool = True) -> Path:
    """Write the Orbax checkpoint of `src` to `dst`; FP8 checkpoints stay FP8 (e4m3 + scales)."""
    checkpoint, dst = open_checkpoint(src), Path(dst)
    model = load_weights(checkpoint, DTYPES[dtype], progress=progress, quantization=quantization)
    save(model, dst, DTYPES[dtype])
    copied = copy_tokenizer(checkpoint, dst)
    if not copied:
        print(f"warning: no tokenizer files next to {src}; pass LLM(tokenizer=...) when loading {dst}",
              file=sys.stderr)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mistral_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory or .gguf file")
    p.add_argument("dst", help="output directory (created)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the saved 16/32-bit parameters (default bfloat16; FP8 projections stay FP8)")
    p.add_argument("--quantization", default=None, choices=[q for q in QUANTIZATIONS if q is not None],
                   help="fp8: quantize the projections now (e4m3 per-channel), as LLM(quantization='fp8') would")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        dst = convert(args.src, args.dst, args.dtype, args.quantization)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[wrote {dst} in {time.perf_counter() - t0:.1f}s; load it with LLM(model={str(dst)!r})]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
