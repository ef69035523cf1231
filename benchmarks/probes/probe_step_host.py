"""Probe: the host's share of a synchronous engine step (issue 21: a speculating sequence is not
pipelined, so every host microsecond of a step adds to its latency; issue 19: the same host work
is what pipelining must hide). One request decoding on random weights of a named config; each
step is launched, waited for and read before the next, and each phase is timed.

    python benchmarks/probes/probe_step_host.py --config mistral-small-2501 [--quantization fp8]
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def main():
    import jax

    from mistral_jax import LLM, SamplingParams
    from mistral_jax.engine import engine as engine_mod
    from mistral_jax.loading.dummy import dummy_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mistral-small-2501")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    llm = LLM(load_format="dummy", config=args.config, quantization=args.quantization, max_model_len=min(2048, dummy_config(args.config).max_seq_len),
              progress=False, warmup=False)
    eng = llm.engine
    times = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[name].append(time.perf_counter() - t)
            return out
        return wrapper

    for name in ("_pack", "_host_to_mesh", "_to_host", "_allowed", "_read", "_launch"):
        setattr(eng, name, timed(name, getattr(eng, name)))
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    engine_mod.SamplingArrays.from_params = timed("SamplingArrays.from_params", engine_mod.SamplingArrays.from_params)
    for i in range(args.batch):
        eng.add_request(list(range(100, 228)), SamplingParams(temperature=0, max_tokens=args.steps + 30, ignore_eos=True))
    for _ in range(10):
        eng.step()
    if eng._pending is not None:
        eng._read(eng._pending)
        eng._pending = None
    times.clear()
    total, wait = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        launched = eng._launch(eng.scheduler.schedule())
        t1 = time.perf_counter()
        jax.block_until_ready(launched.result.tokens)
        wait.append(time.perf_counter() - t1)
        eng._read(launched)
        total.append(time.perf_counter() - t0)
    print(f"{args.config} {args.quantization or 'bf16'} batch {args.batch}: synchronous step "
          f"{np.median(total) * 1e3:.2f} ms, of which waiting for the device {np.median(wait) * 1e3:.2f} ms")
    for name, ts in sorted(times.items(), key=lambda kv: -np.median(kv[1])):
        print(f"  {name:28s} {np.median(ts) * 1e3:7.3f} ms x {len(ts) / args.steps:.0f} per step")


if __name__ == "__main__":
    main()
