"""The embedded default model (SmolLM2-135M-Instruct GGUF) on the CPU: ours against transformers
reading the same file, f32, greedy, batch 1.

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


def bench_ours(ids: list[int]) -> dict:
    from mistral_jax import LLM, SamplingParams

    llm = LLM(dtype="float32", progress=False)
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def run():
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.stream([{"prompt_token_ids": ids}], sp)]
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    run()  # compile
    runs = [run() for _ in range(3)]
    return {"ttft_s": statistics.median(r[0] for r in runs), "decode_tokens_per_s": 1 / statistics.median(r[1] for r in runs)}


def bench_hf(ids: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_jax.default_model import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    with torch.inference_mode():
        gen = lambda n: model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        gen(4)
        ttft = statistics.median(timed(lambda: model(x, logits_to_keep=1)) for _ in range(3))
        step = statistics.median((timed(lambda: gen(NEW_TOKENS)) - timed(lambda: gen(8))) / (NEW_TOKENS - 8)
                                 for _ in range(3))
    return {"ttft_s": ttft, "decode_tokens_per_s": 1 / step, "torch_threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    import numpy as np

    ids = np.random.default_rng(0).integers(100, 49000, size=PROMPT_TOKENS).tolist()
    import jax
    import torch
    import transformers

    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "jax": jax.__version__,
              "torch_version": torch.__version__, "transformers_version": transformers.__version__,
              "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
              "mistral_jax": bench_ours(ids), "transformers": bench_hf(ids)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
