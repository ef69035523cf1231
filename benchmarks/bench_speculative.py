"""Speculative decoding (issue 21): what it gains, where, and what a verify step costs.

    python benchmarks/bench_speculative.py cpu --out cpu.json        # default model, real text
    python benchmarks/bench_speculative.py gpu --config mistral-small-2501 --quantization fp8 --out fp8.json

cpu: the embedded default model at batch 1, greedy, each prompt decoded plainly and with n-gram
speculation (same engine settings, same process, both warm): tokens/s, acceptance, tokens per
verify step, and whether the outputs are equal. Prompts where prompt lookup should help (correct
a paragraph, edit a code file, answer from a document) and where it should not (open chat).

gpu: random weights of a real shape. (1) The step: a plain pipelined decode step (the engine's
steady state) against a verify step carrying k drafts per sequence (k = 0..8) at batch 1, 8 and
32, launched and read back as speculation runs it (not pipelined). (2) The speed-up this predicts:
tokens per verify step / (verify step / plain step), at the acceptance measured on the CPU and
at the issue's reference point (k = 4, 70% of drafts accepted). (3) End to end on random
weights, whose greedy output repeats itself (prompt lookup then accepts nearly everything): the
ceiling of the gain.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import harness
import numpy as np

CPU_PROMPTS = {
    "correct a paragraph": (
        "Fix the spelling mistakes in this paragraph and write it out again in full:\n\n"
        "The Eiffel Tower is a wrought-iron latice tower on the Champ de Mars in Paris, France. It is named "
        "after the enginer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed La dame de fer, it was constructed as the centerpiece of the 1889 World's Fair, "
        "and to crown the centennial anniversery of the French Revolution."),
    "edit a code file": (
        "Rename the function `area` to `rectangle_area` in this file and return the whole file:\n\n"
        "```python\nimport math\n\n\ndef area(width, height):\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
        "def diagonal(width, height):\n    return math.sqrt(width ** 2 + height ** 2)\n\n\n"
        "print(area(3, 4), perimeter(3, 4), diagonal(3, 4))\n```"),
    "answer from a document": (
        "Document: The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 "
        "individual reefs and 900 islands stretching for over 2,300 kilometres over an area of approximately "
        "344,400 square kilometres. The reef is located in the Coral Sea, off the coast of Queensland, "
        "Australia.\n\nQuote the sentence of the document that says where the reef is, then say how long it is."),
    "open chat": "Write a short poem about the first snow of winter.",
    "open chat 2": "Give me three tips for sleeping better, one sentence each.",
}


def _versions() -> dict:
    import jax

    out = {"python": platform.python_version(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "device": jax.devices()[0].device_kind, "machine": platform.machine()}
    try:
        import os

        out["cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return out


def _timed(llm, prompts, params):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, outs


def run_cpu(args) -> dict:
    from mistral_jax import LLM, SamplingParams

    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    plain = LLM(max_model_len=2048, progress=False)
    fast = LLM(max_model_len=2048, progress=False, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    rows = []
    chats = {name: {"prompt_token_ids": plain.tokenizer.encode_chat([{"role": "user", "content": text}])}
             for name, text in CPU_PROMPTS.items()}
    cases = [(name, [prompt], params) for name, prompt in chats.items()]
    cases.append(("open chat, temperature 1", [chats["open chat"]],
                  SamplingParams(temperature=1.0, seed=1, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)))
    batch8 = list(chats.values()) + list(chats.values())[:3]
    cases.append(("batch of 8 (the prompts above)", batch8, [params] * 8))
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split("|")]
    for name, prompts, sp in cases:
        for llm in (plain, fast):  # compile every bucket these lengths use, outside the timing
            llm.generate(prompts, sp)
        before = dict(fast.engine.speculator.stats.__dict__)
        times = {"plain": [], "speculative": []}
        for _ in range(args.repeats):  # alternate, so both see the same machine state
            for key, llm in (("plain", plain), ("speculative", fast)):
                dt, outs = _timed(llm, prompts, sp)
                times[key].append((dt, [o.outputs[0].token_ids for o in outs]))
        stats = fast.engine.speculator.stats
        drafts = stats.num_drafts - before["num_drafts"]
        proposed = stats.num_draft_tokens - before["num_draft_tokens"]
        accepted = stats.num_accepted_tokens - before["num_accepted_tokens"]
        n_tokens = sum(len(t) for t in times["plain"][0][1])
        best = {key: min(dt for dt, _ in v) for key, v in times.items()}
        ratios = sorted(p / q for (p, _), (q, _) in zip(times["plain"], times["speculative"]))
        row = {"prompt": name, "batch": len(prompts), "tokens": n_tokens,
               "plain_tok_s": n_tokens / best["plain"], "speculative_tok_s": n_tokens / best["speculative"],
               "speedup": best["plain"] / best["speculative"],
               "speedup_median_of_pairs": ratios[len(ratios) // 2],
               "verify_steps": drafts, "draft_tokens": proposed, "accepted_tokens": accepted,
               "acceptance_rate": accepted / proposed if proposed else 0.0,
               "tokens_per_verify_step": 1 + accepted / drafts if drafts else 1.0,
               "same_output": all(t == times["plain"][0][1] for _, t in times["plain"] + times["speculative"])}
        rows.append(row)
        print(f"{name:32s} {row['plain_tok_s']:6.1f} -> {row['speculative_tok_s']:6.1f} tok/s "
              f"({row['speedup']:.2f}x)  acceptance {row['acceptance_rate']:.2f}, "
              f"{row['tokens_per_verify_step']:.2f} tokens/verify step, same output: {row['same_output']}",
              flush=True)
    return {"mode": "cpu", "model": "embedded default (SmolLM2-135M-Instruct, f32)", "k": args.k,
            "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "repeats": args.repeats, "rows": rows,
            "versions": _versions()}


def _drain(eng):
    """Read the step in flight, so every sequence's tokens are on the host."""
    if eng._pending is not None:
        eng._read(eng._pending)
        eng._pending = None


def run_gpu(args) -> dict:
    import jax

    from mistral_jax import LLM, SamplingParams
    from mistral_jax.engine.plan import Scheduled, StepPlan
    from mistral_jax.loading.dummy import dummy_config

    context = min(4096, dummy_config(args.config).max_seq_len)
    llm = LLM(load_format="dummy", config=args.config, quantization=args.quantization, max_model_len=context,
              max_num_seqs=512, speculative_config={"method": "ngram", "num_speculative_tokens": 4},
              warmup=False)  # each measurement below runs its programs before timing them
    eng, rng = llm.engine, np.random.default_rng(0)
    vocab = llm.config.vocab_size
    result = {"mode": "gpu", "config": args.config, "quantization": args.quantization or "bf16",
              "versions": _versions(), "steps": [], "end_to_end": []}
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(eng.state))
    result["weight_bytes"] = weight_bytes
    for B in () if args.skip_steps else (1, 8, 32):
        params = SamplingParams(temperature=0, max_tokens=llm.max_model_len - 128, ignore_eos=True)
        ids = [eng.add_request(rng.integers(1000, vocab, size=128).tolist(), params) for _ in range(B)]
        seqs = [eng.sequences[i] for i in ids]
        for s in seqs:
            s.spec = None  # plain decoding here; the handcrafted verify steps below carry the drafts
        while min(s.num_generated for s in seqs) < 3:
            eng.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):  # plain pipelined decode: the engine's steady state
            eng.step()
        plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
        _drain(eng)
        for k in range(0, 9):
            batch = []
            for s in seqs:
                assert eng.scheduler._reserve(s, s.num_computed + 1 + k)
                draft = tuple(int(t) for t in rng.integers(1000, vocab, size=k))
                batch.append(Scheduled(s, s.num_computed, 1 + k, True, draft=draft))
            for rep in range(3 + args.steps):
                if rep == 3:
                    t0 = time.perf_counter()
                launched = eng._launch(StepPlan(tuple(batch)))
                jax.device_get(launched.result.tokens)
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            tokens = B * (1 + k)
            row = {"batch": B, "k": k, "tokens": tokens, "bucket": next(b for b in eng.token_buckets() if b >= tokens),
                   "verify_ms": ms, "plain_pipelined_ms": plain_ms, "ratio": ms / plain_ms}
            result["steps"].append(row)
            print(f"B={B:2d} k={k} tokens={tokens:3d} (bucket {row['bucket']:3d}): verify {ms:6.2f} ms, "
                  f"plain pipelined {plain_ms:6.2f} ms, ratio {row['ratio']:.2f}", flush=True)
        for i in ids:
            eng.abort_request(i)
        eng._pending = None
    floor_ms = weight_bytes / 4.8e12 * 1e3  # H200 HBM3e peak; reported next to the measured steps
    result["weight_read_floor_ms_at_4.8TBps"] = floor_ms
    # End to end: a repeated random phrase; random weights' greedy output loops, so lookup hits.
    phrase = rng.integers(1000, vocab, size=16).tolist()
    prompt = {"prompt_token_ids": phrase * 8}
    params = SamplingParams(temperature=0, max_tokens=args.e2e_tokens, ignore_eos=True)
    spec_sched = eng.scheduler.speculator
    for mode in ("plain", "speculative", "plain", "speculative"):
        eng.speculator = eng.scheduler.speculator = spec_sched if mode == "speculative" else None
        before = dict(spec_sched.stats.__dict__)
        dt, outs = _timed(llm, [prompt], params)
        st = spec_sched.stats
        drafts = st.num_drafts - before["num_drafts"]
        acc = st.num_accepted_tokens - before["num_accepted_tokens"]
        prop = st.num_draft_tokens - before["num_draft_tokens"]
        row = {"mode": mode, "tok_s": len(outs[0].outputs[0].token_ids) / dt, "verify_steps": drafts,
               "acceptance_rate": acc / prop if prop else 0.0,
               "tokens_per_verify_step": 1 + acc / drafts if drafts else 1.0,
               "tokens": outs[0].outputs[0].token_ids}
        result["end_to_end"].append(row)
        print(f"end to end {mode}: {row['tok_s']:.1f} tok/s, acceptance {row['acceptance_rate']:.2f}, "
              f"{row['tokens_per_verify_step']:.2f} tokens/verify step", flush=True)
    e2e = result["end_to_end"]

    def diverge(a, b):  # first index where two token lists differ, None if equal
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                    None if len(a) == len(b) else min(len(a), len(b)))

    result["end_to_end_same_output"] = all(r["tokens"] == e2e[0]["tokens"] for r in e2e)
    result["end_to_end_first_divergence"] = {  # plain vs plain tells nondeterminism from speculation
        "plain_1_vs_plain_2": diverge(e2e[0]["tokens"], e2e[2]["tokens"]),
        "speculative_1_vs_2": diverge(e2e[1]["tokens"], e2e[3]["tokens"]),
        "plain_vs_speculative": diverge(e2e[0]["tokens"], e2e[1]["tokens"])}
    print("first divergence:", result["end_to_end_first_divergence"], flush=True)
    for r in e2e:
        r.pop("tokens")
    return result


def predict(result: dict, tokens_per_step: dict[str, float]) -> list[dict]:
    """Speed-up at batch B and k drafts if each verify step yields `t` tokens."""
    out = []
    for row in result["steps"]:
        if row["k"] == 0:
            continue
        for label, t in tokens_per_step.items():
            t = min(t, 1 + row["k"])
            out.append({"batch": row["batch"], "k": row["k"], "acceptance": label,
                        "tokens_per_step": t, "speedup": t / row["ratio"]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("cpu", "gpu"))
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens (cpu)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default=None, help="cpu: prompt names to run, separated by |")
    p.add_argument("--ignore-eos", action="store_true", help="cpu: always generate --max-tokens tokens")
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--quantization", default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps per point (gpu)")
    p.add_argument("--e2e-tokens", type=int, default=256)
    p.add_argument("--skip-steps", action="store_true", help="gpu: only the end-to-end runs")
    p.add_argument("--cpu-results", default=None, help="a cpu run's JSON: predict at its measured acceptance")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run_cpu(args) if args.mode == "cpu" else run_gpu(args)
    if args.mode == "gpu" and result["steps"]:
        points = {"k=4 with 70% of drafts accepted (3.8 tokens/step)": 3.8}
        if args.cpu_results:
            for row in json.load(open(args.cpu_results))["rows"]:
                points[f"cpu '{row['prompt']}' ({row['tokens_per_verify_step']:.2f} tokens/step)"] = \
                    row["tokens_per_verify_step"]
        result["predicted"] = predict(result, points)
        for r in result["predicted"]:
            if r["k"] == 4:
                print(f"predicted B={r['batch']:2d} k=4 {r['acceptance']}: {r['speedup']:.2f}x")
    harness.write_result(args.out, f"speculative_{args.mode}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
