"""Probe: which kernels does one FP8 decoder layer's projections launch at decode, and how long
does each run (CUPTI device time)? In particular, does XLA fuse x's per-row quantization into
the RMSNorm that produces x, or run it as kernels of its own?

The layer's projection path as the model runs it (mistral_jax.model: rms_norm, then
fp8_matmul_group for q, k, v and for w1, w3, fp8_matmul for o and w2, stacked weights read at a
layer index), attention left out, Mistral-Small-2501 shapes, under the engine's XLA flags.

    python benchmarks/probe_fp8_launches.py --ms 1,64 --out probe_launches.json
"""

from __future__ import annotations

import argparse
import json

import mistral_jax  # noqa: F401  (the engine's XLA flags, under which the model runs)
import jax
import jax.numpy as jnp

from mistral_jax.model import rms_norm
from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_group, quantize_weight

DIM, Q, KV, HIDDEN, LAYERS = 5120, 4096, 1024, 32768, 2  # 2501; two stacked layers, layer 1 used


def stacked(key, n, k):
    w, s = quantize_weight((jax.random.normal(key, (LAYERS * n, k), jnp.float32) * 0.02).astype(jnp.bfloat16))
    return w.reshape(LAYERS, n, k), s.reshape(LAYERS, n)


def layer_projections(x, norm, ws, layer):
    """x: [m, dim] bf16 -> the layer's output [m, dim] without attention (q stands in for it)."""
    (wq, sq), (wk, sk), (wv, sv), (wo, so), (w1, s1), (w3, s3), (w2, s2) = ws
    h = rms_norm(x, norm, 1e-5)
    q, k, v = fp8_matmul_group(h, (wq, wk, wv), (sq, sk, sv), layer=layer)
    x = x + fp8_matmul(q + jnp.tile(k + v, (1, Q // KV)), wo, so, layer=layer)
    h = rms_norm(x, norm, 1e-5)
    g, u = fp8_matmul_group(h, (w1, w3), (s1, s3), layer=layer)
    return x + fp8_matmul(jax.nn.silu(g) * u, w2, s2, layer=layer)


def main():
    from jax.experimental.mosaic.gpu import profiler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,64")
    ap.add_argument("--out", default="probe_fp8_launches.json")
    args = ap.parse_args()
    keys = jax.random.split(jax.random.key(0), 8)
    shapes = [(Q, DIM), (KV, DIM), (KV, DIM), (DIM, Q), (HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN)]
    ws = [stacked(kk, n, k) for kk, (n, k) in zip(keys, shapes)]
    norm = jnp.ones((DIM,), jnp.bfloat16)
    fn = jax.jit(layer_projections)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": []}
    for m in [int(v) for v in args.ms.split(",")]:
        x = jax.random.normal(keys[7], (m, DIM), jnp.bfloat16)
        _, timings = profiler.measure(fn, aggregate=False)(x, norm, ws, jnp.int32(1))
        kernels = [{"name": name[:120], "us": ms * 1e3} for name, ms in timings]
        total = sum(k["us"] for k in kernels)
        res["runs"].append({"m": m, "kernels": kernels, "total_us": total})
        print(f"m={m}: {len(kernels)} kernels, {total:.1f} µs of device time")
        for k in kernels:
            print(f"  {k['us']:8.1f} µs  {k['name']}")
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
