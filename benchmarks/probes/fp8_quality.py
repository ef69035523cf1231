"""FP8 (W8A8: e4m3 per-channel weights quantized at load, per-token dynamic activations) against
full precision on the default model (SmolLM2-135M-Instruct GGUF), f32 activations, CPU.

- greedy agreement: both models generate NEW_TOKENS greedily from each prompt; the fraction of
  tokens equal before the first divergence, and the number of identical continuations.
- KL: mean KL(p_full || p_fp8) of next-token distributions at every position of prompt + the full
  model's continuation (teacher forced, so both models see the same text).

    python benchmarks/probes/fp8_quality.py --out benchmarks/results/2026-11-23_cpu_fp8_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in one sentence.",
    "def fibonacci(n):",
    "List three prime numbers greater than 20:",
    "Once upon a time, in a small village,",
    "Translate to French: The weather is nice today.",
    "What is 17 times 3?",
]


def logits_of(llm, ids: list[int]):
    """[len(ids), vocab] f32 next-token logits of the engine's model (one full forward)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mistral_jax.cache.kv_cache import DenseKVCache

    model = nnx.merge(llm.engine.graphdef, llm.engine.state)
    tokens = jnp.asarray([ids], jnp.int32)
    cache = DenseKVCache.init(model.cfg, 1, len(ids), model.dtype)
    logits, _ = model(tokens, jnp.arange(len(ids))[None], cache)
    return np.asarray(logits[0], np.float64)


def kl(p_logits, q_logits):
    import numpy as np
    from scipy.special import log_softmax

    lp, lq = log_softmax(p_logits, axis=-1), log_softmax(q_logits, axis=-1)
    return (np.exp(lp) * (lp - lq)).sum(-1)  # [positions]


def main(argv=None) -> int:
    import jax
    import numpy as np

    from mistral_jax import LLM, SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    models = {q: LLM(dtype="float32", quantization=q, progress=False) for q in (None, "fp8")}
    full, fp8 = models[None], models["fp8"]
    prompts = [full.tokenizer.encode(text, add_bos=True) for text in PROMPTS]
    outs = {q: [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": ids} for ids in prompts], greedy)]
            for q, llm in models.items()}
    per_prompt = []
    for text, ids, a, b in zip(PROMPTS, prompts, outs[None], outs["fp8"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        seq = ids + a  # teacher forced on the full model's continuation
        divergence = kl(logits_of(full, seq), logits_of(fp8, seq))
        per_prompt.append({"prompt": text, "tokens_equal_before_divergence": same,
                           "mean_kl": float(divergence.mean()), "max_kl": float(divergence.max()),
                           "full_text": full.tokenizer.decode(a), "fp8_text": fp8.tokenizer.decode(b)})
    result = {
        "model": full.model_path, "device": jax.devices()[0].device_kind, "activations": "float32",
        "quantization": "fp8 at load: e4m3 per-output-channel weights, per-token dynamic activations "
                        "(pallas_kernels.fp8_matmul, impl auto)",
        "prompts": len(PROMPTS), "new_tokens": NEW_TOKENS,
        "greedy_agreement": sum(r["tokens_equal_before_divergence"] for r in per_prompt) / (NEW_TOKENS * len(PROMPTS)),
        "identical_continuations": sum(r["tokens_equal_before_divergence"] == NEW_TOKENS for r in per_prompt),
        "mean_kl_nats": float(np.mean([r["mean_kl"] for r in per_prompt])),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_prompt": per_prompt,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
