"""Issue 18's mixed-batch benchmark: do constrained requests slow the unconstrained ones?

    python benchmarks/probes/bench_structured.py --config mistral-small-2501 [--quantization fp8] --out r.json

In one process (LLM(load_format="dummy"), warm-up on), two workloads of U unconstrained
requests (P prompt tokens, O output tokens, greedy, ignore_eos), each run twice, the second
counted: the U alone, then the U beside C requests under a JSON schema (an array of short
strings, long enough to outlast them). Reported: the unconstrained requests' output tokens/s
in both (issue 18: the mixed one must keep >= 90%), the constrained ones' tokens/s, and the
host's mask time per step. The peer of the mixed run is the same batch with the grammars off
(same rows, same sampling settings): the difference is the constraint's cost alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64, "maxItems": 64}


def run(llm, reqs, n_free: int) -> dict:
    """reqs: [(prompt ids, SamplingParams)], the first n_free the unconstrained ones -> tokens/s
    of those and of the rest."""
    engine = llm.engine
    t0 = time.perf_counter()
    for i, (ids, params) in enumerate(reqs):
        engine.add_request(ids, params, index=i)
    done_at, tokens = {}, {}
    for ev in engine.run():
        tokens[ev.index] = tokens.get(ev.index, 0) + 1
        if ev.finished:
            done_at[ev.index] = time.perf_counter() - t0
    out = {}
    for kind in ("free", "others"):
        idx = [i for i in range(len(reqs)) if (i < n_free) == (kind == "free")]
        if idx:
            out[f"{kind}_tokens_per_s"] = sum(tokens[i] for i in idx) / max(done_at[i] for i in idx)
            out[f"{kind}_tokens"] = sum(tokens[i] for i in idx)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--unconstrained", type=int, default=48)
    p.add_argument("--constrained", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--out")
    args = p.parse_args()

    import jax

    from mistral_jax import LLM, SamplingParams
    from mistral_jax.sample.structured import MaskBuffer, StructuredOutputs

    llm = LLM(load_format="dummy", config=args.config, quantization=args.quantization, max_model_len=args.max_model_len,
              max_num_seqs=max(64, args.unconstrained + args.constrained), warmup=True, progress=False)
    build = MaskBuffer.build
    mask_s = []

    def timed(self, rows, constrained):
        t = time.perf_counter()
        out = build(self, rows, constrained)
        mask_s.append(time.perf_counter() - t)
        return out

    MaskBuffer.build = timed
    rng = np.random.default_rng(0)
    vocab = llm.config.vocab_size
    prompt = lambda: rng.integers(min(1000, vocab // 2), vocab, size=args.prompt).tolist()  # noqa: E731
    free = [(prompt(), SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True))
            for _ in range(args.unconstrained)]
    constrained = [(prompt(), SamplingParams(temperature=1.0, seed=i, max_tokens=args.output,
                                             structured_outputs=StructuredOutputs(json=SCHEMA)))
                   for i in range(args.constrained)]
    result = {"config": args.config, "quantization": args.quantization, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "unconstrained": args.unconstrained,
              "constrained": args.constrained, "prompt": args.prompt, "output": args.output}
    # The peer: the same mixed batch with the grammars taken off (same rows, same sampling), so
    # that what is measured is the constraint's cost, not that of more rows or of sampling.
    peer = [(ids, dataclasses.replace(p, structured_outputs=None)) for ids, p in constrained]
    for name, reqs in (("alone", free), ("mixed_peer", free + peer), ("mixed", free + constrained)):
        run(llm, reqs, len(free))
        mask_s.clear()
        result[name] = run(llm, reqs, len(free))
        if mask_s:
            result[name]["mask_ms_per_step_p50"] = float(np.median(mask_s) * 1e3)
        print(name, result[name], flush=True)
    result["free_kept"] = result["mixed"]["free_tokens_per_s"] / result["mixed_peer"]["free_tokens_per_s"]
    print(f"unconstrained tokens/s beside constrained rows / beside the same rows unconstrained: "
          f"{result['free_kept']:.1%} (issue 18: >= 90%)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
