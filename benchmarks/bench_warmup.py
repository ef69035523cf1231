"""Issue 23's GPU benchmark: start-up with warm-up, cold and warm compilation cache, and the time
to first token of the first request, the first prefix-cache hit and a steady-state request.

    python benchmarks/bench_warmup.py --config mistral-small-2501 [--quantization fp8] --out r.json

Runs itself twice in fresh processes (a cold cache directory, then the same directory warm);
each run: LLM(load_format="dummy", warmup=True), then three requests of PROMPT tokens
(greedy, 16 tokens): a fresh prompt (first request after start), the same prompt again (a
whole-prompt prefix hit: only its last token is recomputed), another fresh prompt (steady
state), then the steady state again as the peer figure. Each TTFT must be within 20% of the
steady state's; the warm start's warm-up a small fraction of the cold one's."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness

PROMPT = 1024


def one_run(args) -> dict:
    import numpy as np

    from mistral_jax import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(load_format="dummy", config=args.config, quantization=args.quantization, max_model_len=args.max_model_len,
              warmup=True, progress=False)
    start = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def ttft(ids):
        t = time.perf_counter()
        for _ in llm.stream([{"prompt_token_ids": ids}], params):
            first = time.perf_counter() - t
            break
        for _ in llm.engine.run():  # drain the rest
            pass
        return first

    vocab = llm.config.vocab_size
    fresh = lambda: rng.integers(min(1000, vocab // 2), vocab, size=args.prompt).tolist()
    a = fresh()
    out = {"start_seconds": start, "warmup_seconds": llm.warmup_seconds, "programs": llm.warmup_programs,
           "ttft_first_request": ttft(a), "ttft_prefix_hit": ttft(a), "ttft_steady": ttft(fresh()),
           "ttft_steady_again": ttft(fresh())}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=PROMPT, help="prompt tokens of each request")
    p.add_argument("--out")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    cache = tempfile.mkdtemp(prefix="mj_xla_")
    results = {}
    for name in ("cold", "warm"):
        cmd = [sys.executable, __file__, "--child", "--config", args.config, "--max-model-len", str(args.max_model_len),
               "--prompt", str(args.prompt)]
        if args.quantization:
            cmd += ["--quantization", args.quantization]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MISTRAL_JAX_CACHE_DIR=cache))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[7:])
        print(name, results[name], flush=True)
    import jax

    results.update(config=args.config, quantization=args.quantization, device=jax.devices()[0].device_kind,
                   jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    harness.write_result(args.out, "warmup", results)


if __name__ == "__main__":
    main()
