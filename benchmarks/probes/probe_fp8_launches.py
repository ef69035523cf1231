"""Probe: which kernels does one FP8 decoder layer's projections launch at decode, and how long
does each run (CUPTI device time)? In particular, does XLA fuse x's per-row quantization into
the RMSNorm that produces x, or run it as kernels of its own?

The layer's projection path as the model runs it on one device (mistral_jax.model.transformer: the RMSNorm
fused into the quantization of q/k/v's and w1/w3's input, then fp8_matmul_group for q, k, v and
for w1, w3; fp8_matmul for o; silu(w1 x) * w3 x fused into w2's quantization, then w2; stacked
weights read at a layer index), attention left out, Mistral-Small-2501 shapes, under the
engine's XLA flags. --unfused: the norms and silu as their own XLA ops, x quantized inside each
product (the path before fused quantization; what tp > 1 still runs).

    python benchmarks/probes/probe_fp8_launches.py --ms 1,64 --out probe_launches.json [--unfused]
"""

from __future__ import annotations

import argparse
import functools
import json

import mistral_jax  # noqa: F401  # isort: skip  (before jax: the engine's XLA flags, for the model)
import jax
import jax.numpy as jnp

from pallas_kernels.activations import rms_norm, silu_mul
from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_group, quantize_input, quantize_weight

DIM, Q, KV, HIDDEN, LAYERS = 5120, 4096, 1024, 32768, 2  # 2501; two stacked layers, layer 1 used


def stacked(key, n, k):
    w, s = quantize_weight((jax.random.normal(key, (LAYERS * n, k), jnp.float32) * 0.02).astype(jnp.bfloat16))
    return w.reshape(LAYERS, n, k), s.reshape(LAYERS, n)


def layer_projections(x, norm, ws, layer, fused=True):
    """x: [m, dim] bf16 -> the layer's output [m, dim] without attention (q stands in for it)."""
    (wq, sq), (wk, sk), (wv, sv), (wo, so), (w1, s1), (w3, s3), (w2, s2) = ws

    def quantized(x, **op):  # (x, x_scale): the op and the quantization in one kernel, or the op alone
        if fused:
            return quantize_input(x, eps=1e-5, **op)
        return (rms_norm(x, op["norm"], 1e-5) if "norm" in op else silu_mul(op["gate"], x)), None

    h, h_scale = quantized(x, norm=norm)
    q, k, v = fp8_matmul_group(h, (wq, wk, wv), (sq, sk, sv), layer=layer, x_scale=h_scale)
    x = x + fp8_matmul(q + jnp.tile(k + v, (1, Q // KV)), wo, so, layer=layer)
    h, h_scale = quantized(x, norm=norm)
    g, u = fp8_matmul_group(h, (w1, w3), (s1, s3), layer=layer, x_scale=h_scale)
    h, h_scale = quantized(u, gate=g)
    return x + fp8_matmul(h, w2, s2, layer=layer, x_scale=h_scale)


def main():
    from jax.experimental.mosaic.gpu import profiler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,64")
    ap.add_argument("--out", default="probe_fp8_launches.json")
    ap.add_argument("--unfused", action="store_true", help="norms and silu as XLA ops (tp > 1's path)")
    args = ap.parse_args()
    keys = jax.random.split(jax.random.key(0), 8)
    shapes = [(Q, DIM), (KV, DIM), (KV, DIM), (DIM, Q), (HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN)]
    ws = [stacked(kk, n, k) for kk, (n, k) in zip(keys, shapes)]
    norm = jnp.ones((DIM,), jnp.bfloat16)
    fn = jax.jit(functools.partial(layer_projections, fused=not args.unfused))
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "fused": not args.unfused, "runs": []}
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
