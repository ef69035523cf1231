"""Serving benchmark: many concurrent requests through the paged engine, random weights.

    python benchmarks/bench_serve.py --engine ours --out ours.json [--attention-impl triton]
    python benchmarks/bench_serve.py --engine hf   --out hf.json
    python benchmarks/bench_serve.py --table ceilings.json ours.json hf.json

Workload (seeded, identical for both engines): C concurrent requests submitted at once, prompts
of 128-2048 random tokens, 128-512 output tokens each (ignore_eos), C in 1, 8, 64, 256.
Reported per C: output tokens/s (all output tokens / wall time), median time to first token,
median time per output token (a request's decode time / its tokens after the first).
Each C runs twice; the second run is reported (the first includes compilation).

Prefix cache: 63 requests sharing a 2,000-token system prompt (plus 64-token unique questions,
128 output tokens), with the cache off and on; with it on, one earlier request has cached the
system prompt (each setting runs once before, to compile its buckets).

The transformers peer (eager, bf16) runs the same requests with static batching
(`generate` over the left-padded batch, max_new_tokens = the batch's longest output); only
the requested tokens count. It runs at C = 1 and 8: at 64 and 256 its eager attention over
2,048-token padded prompts does not fit next to the 47 GB of weights on one 80 GB GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import harness
import numpy as np
from bench_generate import _versions, random_engine, random_hf_model

import mistral_jax  # noqa: F401  (XLA flags before JAX starts)

CONCURRENCY = (1, 8, 64, 256)
HF_CONCURRENCY = (1, 8)
PROMPT_RANGE = (128, 2048)
OUTPUT_RANGE = (128, 512)
SYSTEM_TOKENS, QUESTION_TOKENS, PREFIX_REQUESTS, PREFIX_OUTPUT = 2000, 64, 64, 128


def workload(c: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(1000, vocab, size=int(rng.integers(*PROMPT_RANGE, endpoint=True))).tolist(),
             int(rng.integers(*OUTPUT_RANGE, endpoint=True))) for _ in range(c)]


def prefix_workload(vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(1000, vocab, size=SYSTEM_TOKENS).tolist()
    return [(system + rng.integers(1000, vocab, size=QUESTION_TOKENS).tolist(), PREFIX_OUTPUT)
            for _ in range(PREFIX_REQUESTS)]


def summarize(wall: float, first: list[float], last: list[float], counts: list[int]) -> dict:
    tpot = [(end - f) / (n - 1) for f, end, n in zip(first, last, counts) if n > 1]
    return {"requests": len(counts), "output_tokens": sum(counts), "wall_s": wall,
            "output_tokens_per_s": sum(counts) / wall, "ttft_median_s": statistics.median(first),
            "ttft_max_s": max(first), "tpot_median_ms": 1e3 * statistics.median(tpot) if tpot else None}


# ---- ours -------------------------------------------------------------------------------------

def run_ours(engine, requests) -> dict:
    from mistral_jax.sample.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), index=i)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    counts = [0] * len(requests)
    cached = 0
    for ev in engine.run():
        now = time.perf_counter() - t0
        first.setdefault(ev.index, now)
        last[ev.index] = now
        counts[ev.index] += 1
        if ev.finished:
            cached += ev.num_cached_tokens or 0
    wall = time.perf_counter() - t0
    order = range(len(requests))
    out = summarize(wall, [first[i] for i in order], [last[i] for i in order], counts)
    out["cached_prompt_tokens"] = cached
    out["prompt_tokens"] = sum(len(p) for p, _ in requests)
    return out


def bench_ours(config: str, dtype: str, attention_impl: str, max_num_batched_tokens: int, save) -> dict:
    import jax

    engine, cfg, init_s = random_engine(config, dtype, max_model_len=4096, max_num_seqs=max(CONCURRENCY),
                                        max_num_batched_tokens=max_num_batched_tokens,
                                        attention_impl=attention_impl)
    out = {"engine": "mistral_jax", "config": config, "dtype": dtype, "attention_impl": engine.attention_impl,
           "max_num_batched_tokens": max_num_batched_tokens, "num_pages": engine.num_pages,
           "block_size": engine.page_size, "init_seconds": init_s, "params": cfg.num_params(),
           "concurrency": {}, "cold_wall_s": {}, "versions": _versions(), "device": str(jax.devices()[0].device_kind)}
    engine.allocator.enable_prefix_caching = False  # random prompts: measure the engine, not the cache
    for c in CONCURRENCY:
        if c == max(CONCURRENCY):
            prefix_cache_runs(engine, cfg, out, save)  # before the longest run, which may hit a time limit
        reqs = workload(c, cfg.vocab_size, seed=c)
        out["cold_wall_s"][str(c)] = run_ours(engine, reqs)["wall_s"]
        out["concurrency"][str(c)] = run_ours(engine, reqs)
        print(c, out["concurrency"][str(c)], flush=True)
        save(out)  # partial results survive a time limit
    return out


def prefix_cache_runs(engine, cfg, out, save) -> None:
    reqs = prefix_workload(cfg.vocab_size, seed=7)
    prefix = {}
    for on in (False, True):
        engine.allocator.reset_prefix_cache()
        engine.allocator.enable_prefix_caching = on
        for _ in range(2):  # the first pass compiles this mix's buckets; the second is reported
            engine.allocator.reset_prefix_cache()
            run_ours(engine, reqs[:1])  # one earlier request has put the system prompt in the cache
            prefix["on" if on else "off"] = run_ours(engine, reqs[1:])
        print("prefix", on, prefix["on" if on else "off"], flush=True)
        out["prefix_cache"] = prefix
        save(out)
    engine.allocator.enable_prefix_caching = False


# ---- transformers peer ------------------------------------------------------------------------

def bench_hf(config: str) -> dict:
    import torch

    from mistral_jax.config import ModelConfig

    cfg = ModelConfig.named(config)
    model, _ = random_hf_model(config, torch.bfloat16)

    def run(requests):
        width = max(len(p) for p, _ in requests)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in requests], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in requests], device="cuda")
        new = max(n for _, n in requests)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        step = (wall - ttft) / max(new - 1, 1)
        # Static batching: every request's tokens arrive together; request i is done after n_i.
        counts = [n for _, n in requests]
        return summarize(wall, [ttft] * len(requests), [ttft + (n - 1) * step for n in counts], counts)

    out = {"engine": "transformers (eager, static batch)", "config": config, "concurrency": {}}
    with torch.inference_mode():
        for c in HF_CONCURRENCY:
            reqs = workload(c, cfg.vocab_size, seed=c)
            run(reqs[:1])  # warm-up
            out["concurrency"][str(c)] = run(reqs)
            print(c, out["concurrency"][str(c)], flush=True)
        reqs = prefix_workload(cfg.vocab_size, seed=7)[1:9]
        out["prefix_cache"] = {"off": run(reqs), "note": "8 of the 63 shared-prefix requests, batch 8"}
    out["versions"] = _versions()
    out["device"] = torch.cuda.get_device_name()
    return out


# ---- table ------------------------------------------------------------------------------------

def table(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    ceil = next((r for r in runs if "hbm_bytes_per_s" in r), None)
    ours = next(r for r in runs if r.get("engine") == "mistral_jax")
    hf = next((r for r in runs if r.get("engine", "").startswith("transformers")), None)
    lines = [f"Device: {ours['device']}; versions: {json.dumps(ours['versions'])}",
             f"Engine: attention {ours['attention_impl']}, block_size {ours['block_size']}, "
             f"{ours['num_pages']} pages, max_num_batched_tokens {ours['max_num_batched_tokens']}"]
    if ceil:
        per_step = 2 * ours["params"] / ceil["hbm_bytes_per_s"]  # bf16 weights read once per step
        lines.append(f"Ceiling: HBM copy {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s -> a decode step reads the "
                     f"weights in >= {per_step * 1e3:.1f} ms (TPOT floor; KV reads add to it)")
    lines += ["", "| concurrent | ours tok/s | ours TTFT med (max) | ours TPOT med | transformers tok/s | "
              "transformers TTFT | transformers TPOT | cold run (compile) |", "|---|---|---|---|---|---|---|---|"]
    for c, r in ours["concurrency"].items():
        h = hf["concurrency"].get(c) if hf else None
        hcols = (f"{h['output_tokens_per_s']:,.0f} | {h['ttft_median_s']:.2f} s | {h['tpot_median_ms']:.1f} ms"
                 if h else "n/a | n/a | n/a")
        lines.append(f"| {c} | {r['output_tokens_per_s']:,.0f} | {r['ttft_median_s']:.2f} s ({r['ttft_max_s']:.2f}) | "
                     f"{r['tpot_median_ms']:.1f} ms | {hcols} | "
                     f"{ours['cold_wall_s'][c]:.0f} s vs {r['wall_s']:.0f} s |")
    p = ours.get("prefix_cache", {})
    lines += ["", f"Prefix cache, {PREFIX_REQUESTS - 1} requests sharing a {SYSTEM_TOKENS}-token system prompt:",
              "", "| prefix cache | tok/s | TTFT med | cached / prompt tokens |", "|---|---|---|---|"]
    for k in [k for k in ("off", "on") if k in p]:
        r = p[k]
        lines.append(f"| {k} | {r['output_tokens_per_s']:,.0f} | {r['ttft_median_s']:.2f} s | "
                     f"{r['cached_prompt_tokens']:,} / {r['prompt_tokens']:,} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=("ours", "hf"))
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--out")
    p.add_argument("--table", nargs="*")
    p.add_argument("--smoke", action="store_true", help="a tiny workload, to check the script on a CPU")
    args = p.parse_args()
    if args.smoke:
        global CONCURRENCY, HF_CONCURRENCY, PROMPT_RANGE, OUTPUT_RANGE, SYSTEM_TOKENS, PREFIX_REQUESTS, PREFIX_OUTPUT
        CONCURRENCY, HF_CONCURRENCY, PROMPT_RANGE, OUTPUT_RANGE = (1, 4), (1,), (16, 64), (4, 8)
        SYSTEM_TOKENS, PREFIX_REQUESTS, PREFIX_OUTPUT = 64, 4, 4
    if args.table:
        print(table(args.table))
        return 0

    def save(result):
        if args.out:
            harness.write_result(args.out, f"serve_{args.engine}", result)

    if args.engine == "ours":
        save(bench_ours(args.config, args.dtype, args.attention_impl, args.max_num_batched_tokens, save))
    else:
        save(bench_hf(args.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
