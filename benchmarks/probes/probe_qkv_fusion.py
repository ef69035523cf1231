"""Probe (issue 19): q, k and v of a decode step as one product instead of three?
Wall time per call and CUPTI device time (summed per kernel name) of each variant.

A 40-layer scan of only the attention input projections (Mistral-Small-2501 shapes, random
weights, the engine's XLA flags), at 1 / 32 / 64 rows, device time per step:
- bf16 "separate": wq [L, 32, 128, 5120], wk and wv [L, 8, 128, 5120] as three einsums (today);
- bf16 "kv": wq as today, wk and wv stacked as wkv [L, 2, 8, 128, 5120], one einsum for both;
- bf16 "qkv": one stack [L, 8, 6, 128, 5120], per kv head its 4 query heads, its k and its v
  (a layout tp can split by kv head), one einsum;
- bf16 "none": the loop without projections (its own cost);
- fp8 "group": today's fp8_matmul_group over wq, wk, wv (one Triton launch, or per weight);
- fp8 "one": fp8_matmul of one [L, 6144, 5120] stack.
Floor: the weights' bytes at 4.19 TB/s (the H200's measured copy rate, docs/performance.md).

    PYTHONPATH=. python benchmarks/probes/probe_qkv_fusion.py --out $OUT/qkv_fusion.json
"""

from __future__ import annotations

import argparse
import json
import time

import mistral_jax  # noqa: F401  # isort: skip  (before jax: the engine's XLA flags)
import jax
import jax.numpy as jnp

DIM, H, KV, D, LAYERS, BW = 5120, 32, 8, 128, 40, 4.19e12


def consume(x, *ys):
    """Keep every output alive without letting XLA slice the products away: scale x by their sums."""
    s = sum(y.astype(jnp.float32).sum() for y in ys)
    return (x * (1 + 1e-9 * s)).astype(x.dtype)


def bf16_step(variant):
    def body(x, w):
        if variant == "separate":
            ys = [jnp.einsum("bse,hde->bshd", x, w[n]) for n in ("q", "k", "v")]
        elif variant == "kv":
            ys = [jnp.einsum("bse,hde->bshd", x, w["q"]), jnp.einsum("bse,thde->tbshd", x, w["kv"])]
        elif variant == "qkv":
            y = jnp.einsum("bse,kgde->bskgd", x, w["qkv"])  # [b, s, kv, 6, d]
            ys = [y[..., :4, :].reshape(*y.shape[:2], H, D), y[..., 4, :], y[..., 5, :]]
        else:
            ys = [w["q"][0, 0, :8].astype(jnp.float32)]
        return consume(x, *ys), None

    return jax.jit(lambda x, w: jax.lax.scan(body, x, w)[0])


def bf16_weights(variant, key):
    r = lambda *s: (jax.random.normal(key, (LAYERS, *s), jnp.float32) * 0.02).astype(jnp.bfloat16)  # noqa: E731
    if variant == "qkv":
        return {"qkv": r(KV, 6, D, DIM)}
    if variant == "kv":
        return {"q": r(H, D, DIM), "kv": r(2, KV, D, DIM)}
    if variant == "none":
        return {"q": r(1, 1, 8)}
    return {"q": r(H, D, DIM), "k": r(KV, D, DIM), "v": r(KV, D, DIM)}


def fp8_step(variant):
    from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_group

    def run(x, ws):
        def body(layer, x):
            x2 = x.reshape(-1, DIM)
            if variant == "group":
                ys = fp8_matmul_group(x2, [w for w, _ in ws], [s for _, s in ws], layer=layer)
            else:
                ys = [fp8_matmul(x2, ws[0][0], ws[0][1], layer=layer)]
            return consume(x, *ys)

        return jax.lax.fori_loop(0, LAYERS, body, x)

    return jax.jit(run)


def fp8_weights(variant, key):
    from pallas_kernels.fp8_matmul import quantize_weight

    def stack(n):
        w = (jax.random.normal(key, (LAYERS * n, DIM), jnp.float32) * 0.02).astype(jnp.bfloat16)
        w, s = quantize_weight(w)
        return w.reshape(LAYERS, n, DIM), s.reshape(LAYERS, n)

    return [stack(H * D), stack(KV * D), stack(KV * D)] if variant == "group" else [stack((H + 2 * KV) * D)]


def timed(fn, x, w, reps):
    jax.block_until_ready(fn(x, w))
    t = time.perf_counter()
    for _ in range(reps):
        x = fn(x, w)
    jax.block_until_ready(x)
    return (time.perf_counter() - t) / reps


def device_time(fn, x, w):
    """(total device µs of one call, {kernel name: µs}) by CUPTI."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(fn, aggregate=False)(x, w)
    per = {}
    for name, ms in timings:
        per[name[:80]] = round(per.get(name[:80], 0) + ms * 1e3, 1)
    return round(sum(per.values()), 1), per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,32,64")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="qkv_fusion.json")
    args = ap.parse_args()
    key = jax.random.key(0)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "layers": LAYERS, "rows": {}}
    floor_bf16 = LAYERS * (H + 2 * KV) * D * DIM * 2 / BW
    out["floor_ms"] = {"bf16": round(floor_bf16 * 1e3, 3), "fp8": round(floor_bf16 / 2 * 1e3, 3)}
    cases = [("bf16", v, bf16_step, bf16_weights) for v in ("none", "separate", "kv", "qkv")]
    cases += [("fp8", v, fp8_step, fp8_weights) for v in ("group", "one")]
    for dtype, variant, step, weights in cases:
        w = weights(variant, key)
        fn = step(variant)
        for m in map(int, args.ms.split(",")):
            x = (jax.random.normal(key, (m, 1, DIM), jnp.float32)).astype(jnp.bfloat16)
            ms = timed(fn, x, w, args.reps) * 1e3
            dev_us, kernels = device_time(fn, x, w)
            out["rows"].setdefault(f"{dtype}_{variant}", {})[m] = {"wall_ms": round(ms, 3), "device_us": dev_us,
                                                                  "kernels": kernels}
            print(f"RESULT {dtype} {variant} m={m}: {ms:.3f} ms per 40 layers, device {dev_us} us", flush=True)
            print("   ", sorted(kernels.items(), key=lambda kv: -kv[1])[:6], flush=True)
        del w
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
