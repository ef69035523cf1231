"""The embedded default model (SmolLM2-135M-Instruct GGUF) on the CPU: ours against transformers
reading the same file, f32, greedy, batch 1 and 8 (128-token prompts, 64 new tokens), and the
README's first command's wall time with a cold and a warm compilation cache (issue 20).

    python benchmarks/bench_cpu_default.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROMPT_TOKENS = 128
NEW_TOKENS = 64


def bench_ours(batches: list[list[list[int]]]) -> dict:
    from mistral_jax import LLM, SamplingParams

    llm = LLM(dtype="float32", progress=False)
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def run(prompts):
        """(time to the first token, decode tokens/s over all rows after every row's first)"""
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.stream([{"prompt_token_ids": p} for p in prompts], sp)]
        start = stamps[len(prompts) - 1]
        return stamps[0] - t0, (len(stamps) - len(prompts)) / (stamps[-1] - start)

    out = {}
    for prompts in batches:
        run(prompts)  # compile
        runs = [run(prompts) for _ in range(3)]
        out[f"batch{len(prompts)}"] = {"ttft_s": statistics.median(r[0] for r in runs),
                                      "decode_tokens_per_s": statistics.median(r[1] for r in runs)}
    return out


def bench_hf(batches: list[list[list[int]]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_jax.default_model import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    out = {"torch_threads": torch.get_num_threads()}
    for prompts in batches:  # equal lengths: no padding
        x = torch.tensor(prompts)
        with torch.inference_mode():
            gen = lambda n: model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            gen(4)
            ttft = statistics.median(timed(lambda: model(x, logits_to_keep=1)) for _ in range(3))
            step = statistics.median((timed(lambda: gen(NEW_TOKENS)) - timed(lambda: gen(8))) / (NEW_TOKENS - 8)
                                     for _ in range(3))
        out[f"batch{len(prompts)}"] = {"ttft_s": ttft, "decode_tokens_per_s": len(prompts) / step}
    return out


def readme_command(cache_dir: str) -> float:
    """Wall seconds of the README's first command's model run (`python -m mistral_jax.generate`)."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mistral_jax.generate"], check=True, capture_output=True,
                   env=dict(os.environ, MISTRAL_JAX_CACHE_DIR=cache_dir))
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    import numpy as np

    rng = np.random.default_rng(0)
    batches = [rng.integers(100, 49000, size=(b, PROMPT_TOKENS)).tolist() for b in (1, 8)]
    import jax
    import torch
    import transformers

    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "jax": jax.__version__,
              "torch_version": torch.__version__, "transformers_version": transformers.__version__,
              "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
              "mistral_jax": bench_ours(batches), "transformers": bench_hf(batches)}
    import tempfile

    cache = tempfile.mkdtemp(prefix="mj_cold_")
    result["readme_command_s"] = {"cold_cache": readme_command(cache), "warm_cache": readme_command(cache)}
    for b in ("batch1", "batch8"):
        result[f"{b}_decode_vs_transformers"] = (result["mistral_jax"][b]["decode_tokens_per_s"]
                                                 / result["transformers"][b]["decode_tokens_per_s"])
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
