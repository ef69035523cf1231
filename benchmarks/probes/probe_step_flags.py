"""Probe (issue 19): a steady decode step's time at batch 1 and 32 (--batches) under the XLA
flags in XLA_FLAGS (one process per variant: run_step_flags_gpu.sh), random Mistral-Small-2501
weights; --top-k-chunk, --top-p and --fp8-triton-max-m vary the sampler's logprobs top-k, the
sampling, and the FP8 kernel choice. When the host's share of a step (launching the layer loop's
CUDA graph once per layer, ~265 us each at batch 32 on an H200; the next step's Python) cannot
overlap the device's, the device waits: docs/performance.md, 2026-12-04."""

from __future__ import annotations

import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", default="mistral-small-2501")
    ap.add_argument("--top-k-chunk", type=int, default=None, help="sampling.TOP_K_CHUNK (0: one lax.top_k per row)")
    ap.add_argument("--fp8-triton-max-m", type=int, default=None,
                    help="fp8_matmul.GPU_TRITON_MAX_M: rows up to which FP8 products run the Triton kernel")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="the engine's max_num_seqs (default the largest batch); it sets the sampling rows' bucket")
    ap.add_argument("--min-token-bucket", type=int, default=None,
                    help="engine.MIN_TOKEN_BUCKET: the smallest step (tokens) on an accelerator (default 16)")
    ap.add_argument("--top-p", type=float, default=None,
                    help="sample at temperature 0.7 with this top_p (default greedy)")
    args = ap.parse_args()
    import bench_generate as bg

    from mistral_jax.sample import sampling
    from mistral_jax.sample.sampling import SamplingParams

    if args.top_k_chunk is not None:
        sampling.TOP_K_CHUNK = {"gpu": args.top_k_chunk or None}
    if args.fp8_triton_max_m is not None:
        import pallas_kernels.fp8_matmul as fp8

        fp8.GPU_TRITON_MAX_M = args.fp8_triton_max_m
    if args.min_token_bucket is not None:
        from mistral_jax.engine import buckets as engine_module

        engine_module.MIN_TOKEN_BUCKET = args.min_token_bucket
    sampled = dict(temperature=0.7, top_p=args.top_p, seed=0) if args.top_p else dict(temperature=0.0)
    batches = [int(b) for b in args.batches.split(",")]
    engine, _, _ = bg.random_engine(args.config, "bfloat16", args.quantization, "auto", None,
                                    max_num_seqs=args.max_num_seqs or max(batches),
                                    max_num_batched_tokens=max(512, 64 * max(batches)),
                                    enable_prefix_caching=False)
    out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "quantization": args.quantization,
           "top_k_chunk": sampling.TOP_K_CHUNK, "sampling": sampled, "fp8_triton_max_m": args.fp8_triton_max_m,
           "max_num_seqs": args.max_num_seqs or max(batches),
           "min_token_bucket": args.min_token_bucket}
    for b in batches:
        for i in range(b):
            engine.add_request(list(range(10 + i, 74 + i)), SamplingParams(max_tokens=2 * args.steps + 40,
                                                                           ignore_eos=True, **sampled))
        for _ in range(args.steps):  # prefill, compiles, steady
            engine.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        out[f"b{b}_ms"] = round((time.perf_counter() - t) / args.steps * 1e3, 3)
        for rid in [r.request_id for r in list(engine.scheduler.running)]:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
