"""Weight load time: safetensors (streamed) against Orbax (restored into the mesh's shardings).

    python benchmarks/probes/bench_load.py [--model PATH] [--dtype bfloat16] [--repeats 3] [--out results/x.json]

From one source (default: the embedded GGUF demo model) it writes a Mistral-format safetensors
copy and an Orbax copy of the same weights (saved in --dtype), then times LLM's weight load
(`LLM.load_seconds`: checkpoint -> device arrays) of each, in a fresh process per load so no
compiled program or open file is shared; the OS page cache is warm after the first repeat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def write_safetensors(src: str, dst: Path, dtype: str) -> None:
    """The canonical tensors of `src` as params.json + consolidated.safetensors, tokenizer copied."""
    from safetensors.numpy import save_file

    from mistral_jax.entrypoints.convert import copy_tokenizer
    from mistral_jax.loading.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "params.json").write_text(json.dumps(ckpt.config.to_mistral_params()))
    save_file({n: a.astype(NP_DTYPES[dtype]) for n, a in ckpt.tensors(progress=False)},
              str(dst / "consolidated.safetensors"))
    copy_tokenizer(ckpt, dst)


def time_load(path: Path) -> float:
    code = ("from mistral_jax import LLM\n"
            f"print(LLM(model={str(path)!r}, progress=False, num_pages=8, max_num_seqs=1).load_seconds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from mistral_jax.entrypoints.convert import convert
    from mistral_jax.loading.default_model import default_model_path

    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(NP_DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    src = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        st, ob = Path(tmp) / "safetensors", Path(tmp) / "orbax"
        write_safetensors(src, st, args.dtype)
        convert(src, ob, dtype=args.dtype, progress=False)
        sizes = {k: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for k, d in
                 (("safetensors", st), ("orbax", ob))}
        times = {k: [time_load(d) for _ in range(args.repeats)] for k, d in (("safetensors", st), ("orbax", ob))}
    result = dict(model=src, dtype=args.dtype, bytes=sizes, load_seconds=times,
                  best={k: min(v) for k, v in times.items()})
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
