"""Issue 22 probe (one GPU is enough): the FP8 Triton kernel on a 2-4 GiB weight stack, the size
of Mistral-Small-2501's w1/w3/w2 stacks per GPU at tp=2 (3.36 GB).

    python benchmarks/probes/probe_fp8_tp.py            # every case, each in its own process
    python benchmarks/probes/probe_fp8_tp.py CASE       # one case (prints one JSON line)

Cases: the Triton kernel read as plain e4m3 (the old path, `pairs=False`) at layer 0 and at the
last layer; the same read as uint16 pairs (the fix); the Mosaic GPU kernel on the same stacks;
then the time per product of the old and new Triton paths and the wgmma kernel (layers 0-9,
where the old path's offsets stay small) against the bytes of one layer's weight."""

from __future__ import annotations

import json
import subprocess
import sys
import time

STACKS = {"w13": (40, 16384, 5120), "w2": (40, 5120, 16384), "w13_tp1": (40, 32768, 5120)}
CASES = [f"check:{impl}:{s}:{m}:{layer}" for impl, s, m, layer in [
    ("triton-plain", "w13", 1, 0), ("triton-plain", "w13", 1, 39), ("triton-plain", "w2", 1, 39),
    ("triton", "w13", 1, 39), ("triton", "w2", 1, 39), ("triton", "w2", 512, 39),
    ("mgpu", "w13", 512, 39), ("mgpu", "w2", 512, 39), ("mgpu", "w13_tp1", 512, 39), ("mgpu", "w2", 1, 39)]]
CASES += ["time:w13", "time:w2"]


def stack(name):
    import jax
    import jax.numpy as jnp

    layers, n, k = STACKS[name]

    def draw(key):
        bits = jax.random.bits(key, (1024, k), jnp.uint8)
        return jax.lax.bitcast_convert_type(bits & 0xF7, jnp.float8_e4m3fn)  # |w| <= 240, no NaN

    keys = jax.random.split(jax.random.key(0), layers * n // 1024)
    w = jax.jit(lambda keys: jax.lax.map(draw, keys).reshape(layers, n, k))(keys)
    s = jax.random.uniform(jax.random.key(1), (layers, n), jnp.float32, 0.5, 2.0)
    return w, s


def product(impl, x, w, s, layer):
    from pallas_kernels.fp8_matmul.mgpu import fp8_matmul_mgpu
    from pallas_kernels.fp8_matmul.triton import fp8_matmul_triton

    if impl == "mgpu":
        return fp8_matmul_mgpu(x, w, s, layer=layer)
    return fp8_matmul_triton(x, w, s, layer=layer, pairs=False if impl == "triton-plain" else None)


def check(impl, name, m, layer):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.fp8_matmul import fp8_matmul_reference

    w, s = stack(name)
    x = jax.random.normal(jax.random.key(2), (m, w.shape[2]), jnp.bfloat16)
    out = np.asarray(jax.jit(lambda x, w, s, i: product(impl, x, w, s, i))(x, w, s, jnp.int32(layer)), np.float64)
    ref = np.asarray(fp8_matmul_reference(x, w[layer], s[layer]), np.float64)
    return {"err": float(np.abs(out - ref).max() / np.abs(ref).max())}


def timing(name):
    import jax
    import jax.numpy as jnp

    w, s = stack(name)
    layer_bytes = w.shape[1] * w.shape[2]
    out = {}
    for m in (1, 16, 64):
        x = jax.random.normal(jax.random.key(3), (m, w.shape[2]), jnp.bfloat16)
        for impl in ("triton-plain", "triton", "mgpu"):
            @jax.jit
            def ten_layers(x, w, s):  # layers 0-9: a model-like walk, offsets < 2 GiB for the old path
                # traced (and timed) in this iteration only: impl and m are this iteration's
                return jax.lax.fori_loop(0, 10, lambda i, acc: acc + product(impl, x, w, s, i).astype(jnp.float32),  # noqa: B023
                                         jnp.zeros((m, w.shape[1]), jnp.float32))  # noqa: B023

            jax.block_until_ready(ten_layers(x, w, s))
            times = []
            for _ in range(7):
                t = time.perf_counter()
                jax.block_until_ready(ten_layers(x, w, s))
                times.append((time.perf_counter() - t) / 10)
            us = sorted(times)[3] * 1e6
            out[f"m{m}_{impl}"] = {"us": round(us, 1), "TB/s": round(layer_bytes / us / 1e6, 2)}
    return out


def main():
    if len(sys.argv) > 1:
        kind, *args = sys.argv[1].split(":")
        result = check(args[0], args[1], int(args[2]), int(args[3])) if kind == "check" else timing(args[0])
        print("RESULT " + json.dumps(result), flush=True)
        return
    for case in CASES:
        p = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=300)
        line = next((ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        err = next((ln.strip()[:160] for ln in (p.stderr.splitlines()[::-1]) if "Error" in ln or "error" in ln), "")
        print(f"{case:32s} rc={p.returncode} {line or err}", flush=True)


if __name__ == "__main__":
    main()
