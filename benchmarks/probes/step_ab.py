"""The decode step of one source tree (PYTHONPATH picks it): a steady step's milliseconds at each
--batches row count, random Mistral-Small weights, greedy. Only the public API (`mistral_jax.LLM`,
its `engine`'s add_request / step / abort_all), so two trees of different layouts run the same
code: a refactor's before/after in one GPU call (run_step_ab_gpu.sh)."""

from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batches", default="1,32,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", default="mistral-small-2501")
    ap.add_argument("--label", default="")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    import mistral_jax
    from mistral_jax import LLM, SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(load_format="dummy", config=args.config, dtype="bfloat16", quantization=args.quantization,
              max_model_len=args.max_model_len, max_num_seqs=max(batches),
              max_num_batched_tokens=max(512, 64 * max(batches)),
              enable_prefix_caching=False, warmup=False, progress=False)
    engine = llm.engine
    out = {"label": args.label, "tree": mistral_jax.__file__, "quantization": args.quantization}
    for b in batches:
        for i in range(b):
            engine.add_request(list(range(10 + i, 74 + i)),
                               SamplingParams(max_tokens=2 * args.steps + 40, ignore_eos=True, temperature=0.0))
        for _ in range(args.steps):  # prefill, compiles, steady
            engine.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        out[f"b{b}_ms"] = round((time.perf_counter() - t) / args.steps * 1e3, 3)
        engine.abort_all()
        while engine.has_unfinished_requests():
            engine.step()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
