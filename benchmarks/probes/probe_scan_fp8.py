"""Probe: does a layer scan copy each layer's fp8 weight out of the stacked array before the
Pallas kernel (a custom call needs its own buffer), where XLA's own dot reads the slice in place?

Times lax.scan over 40 layers of a stacked Mistral-Small-2501 w1 [40, 32768, 5120] at m=1 for
the Triton kernel handed each layer's slice (`triton`) or the whole stack and the layer index
(`triton_stacked`, what the model does now), XLA's fp8 dot and XLA bf16, and counts the copies
of weight size in the optimized HLO of each.

    python benchmarks/probes/probe_scan_fp8.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import time

import mistral_jax  # noqa: F401  # isort: skip  (before jax: the engine's XLA flags, for the model)
import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul import fp8_matmul, quantize_weight

L, N, K, M = 40, 32768, 5120, 1
if jax.default_backend() == "cpu":  # a smoke run
    L, N, K = 3, 256, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_scan_fp8.json")
    args = ap.parse_args()
    key = jax.random.key(0)
    w_bf16 = jax.jit(lambda k: (jax.random.normal(k, (L, N, K), jnp.float32) * 0.02).astype(jnp.bfloat16))(key)
    w_q, w_s = jax.jit(jax.vmap(quantize_weight))(w_bf16)
    x = jax.random.normal(jax.random.key(1), (M, K), jnp.bfloat16)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "L": L, "n": N, "k": K, "m": M}

    def scan_of(step):
        def run(x, *ws):
            def body(acc, w):
                y = step(x + acc.astype(x.dtype), *w)
                return acc + y[0, 0].astype(jnp.float32), None
            return jax.lax.scan(body, jnp.float32(0), ws)[0]
        return jax.jit(run)

    def stacked(impl):
        """The model's way since the probe: the whole stack stays put, the kernel reads layer i."""
        def run(x, w, s):
            def body(carry, _):
                acc, i = carry
                y = fp8_matmul(x + acc.astype(x.dtype), w, s, layer=i, impl=impl)
                return (acc + y[0, 0].astype(jnp.float32), i + 1), None
            return jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), None, length=L)[0][0]
        return jax.jit(run)

    cases = {
        "triton_stacked": (stacked("triton"), (w_q, w_s), N * K),
        "triton": (scan_of(lambda x, w, s: fp8_matmul(x, w, s, impl="triton")), (w_q, w_s), N * K),
        "xla_fp8": (scan_of(lambda x, w, s: fp8_matmul(x, w, s, impl="xla")), (w_q, w_s), N * K),
        "xla_bf16": (scan_of(lambda x, w: x @ w.T), (w_bf16,), 2 * N * K),
    }
    if jax.default_backend() == "cpu":
        cases.pop("triton")  # Pallas/Triton compiles only for a GPU
        cases.pop("triton_stacked")
    for name, (fn, ws, wbytes) in cases.items():
        hlo = fn.lower(x, *ws).compile().as_text()
        jax.block_until_ready(fn(x, *ws))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, *ws))
            times.append(time.perf_counter() - t0)
        t = sorted(times)[2] / L
        big = [ln.strip()[:160] for ln in hlo.splitlines()
               if re.search(r"(copy|dynamic-slice|dynamic_slice)", ln) and f"{N},{K}]" in ln]
        res[name] = {"us_per_layer": t * 1e6, "weight_TBs": wbytes / t / 1e12, "weight_sized_copy_lines": big[:8]}
        print(name, f"{t * 1e6:.1f} us/layer, {wbytes / t / 1e12:.2f} TB/s", len(big), "weight-sized copy/slice lines",
              flush=True)
        for ln in big[:4]:
            print("   ", ln)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
