"""Probe: the kernels of one model forward (a prefill of T tokens into a dense cache), by CUPTI
device time, summed by kernel name. Random weights of a named config, cut to a few layers so it
builds in seconds; compare two versions of the code by running it under each (PYTHONPATH).

    python benchmarks/probes/probe_model_kernels.py --tokens 512,4096 --layers 4 --quantization fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import mistral_jax  # noqa: F401  # isort: skip  (before jax: the engine's XLA flags)
import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.cache.kv_cache import DenseKVCache
from mistral_jax.config import ModelConfig
from mistral_jax.loading.weights import random_weights


def main():
    from jax.experimental.mosaic.gpu import profiler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mistral-small-2501")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="512")
    ap.add_argument("--quantization", default="fp8")
    ap.add_argument("--out", default="probe_model_kernels.json")
    args = ap.parse_args()
    cfg = dataclasses.replace(ModelConfig.named(args.config), n_layers=args.layers)
    model = random_weights(cfg, jnp.bfloat16, quantization=None if args.quantization == "bf16" else args.quantization)

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, cache):  # the weights as an argument, not 5 GB of constants
        t = tokens.shape[1]
        return nnx.merge(graphdef, state)(tokens, jnp.arange(t)[None], cache, logits_at=jnp.array([[t - 1]]))

    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "layers": args.layers, "runs": []}
    for t in [int(v) for v in args.tokens.split(",")]:
        tokens = jax.random.randint(jax.random.key(t), (1, t), 0, cfg.vocab_size)
        cache = DenseKVCache.init(cfg, 1, t, jnp.bfloat16)
        _, timings = profiler.measure(forward, aggregate=False)(state, tokens, cache)
        by_name: dict[str, list[float]] = {}
        for name, ms in timings:
            key = re.sub(r"(__|_)\d+$", "", name)  # fusion_12, quantize_rows__2 -> one name
            by_name.setdefault(key, []).append(ms * 1e3)
        total = sum(sum(v) for v in by_name.values())
        rows = sorted(((k, sum(v), len(v)) for k, v in by_name.items()), key=lambda r: -r[1])
        res["runs"].append({"tokens": t, "total_us": total, "kernels": len(timings),
                            "by_name": [{"name": k[:100], "us": us, "count": n} for k, us, n in rows]})
        print(f"tokens={t}: {len(timings)} kernels, {total:.0f} µs ({total / args.layers:.0f} per layer)")
        for k, us, n in rows[:14]:
            print(f"  {us:9.1f} µs  {n:4d}x  {k[:90]}")
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
