"""Batch-1 CPU decode: does slicing stacked layer weights inside lax.scan cost a copy per layer?
Default-model MLP shapes (30 layers, dim 576, hidden 1536, f32), one token.
    python benchmarks/probes/probe_cpu_layer_loop.py"""
import time

import jax
import jax.numpy as jnp
import numpy as np

L, D, H = 30, 576, 1536
rng = np.random.default_rng(0)
w1 = jnp.asarray(rng.standard_normal((L, H, D), np.float32) * 0.02)
w2 = jnp.asarray(rng.standard_normal((L, D, H), np.float32) * 0.02)
x = jnp.asarray(rng.standard_normal((1, D), np.float32))


def layer(x, a, b):
    return x + jnp.einsum("bh,dh->bd", jax.nn.silu(jnp.einsum("bd,hd->bh", x, a)), b)


@jax.jit
def scan_xs(x, w1, w2):
    return jax.lax.scan(lambda x, ws: (layer(x, *ws), None), x, (w1, w2))[0]


@jax.jit
def fori_index(x, w1, w2):
    return jax.lax.fori_loop(0, L, lambda i, x: layer(x, w1[i], w2[i]), x)


@jax.jit
def unrolled(x, w1s, w2s):
    for a, b in zip(w1s, w2s):
        x = layer(x, a, b)
    return x


@jax.jit
def scan_flat(x, w1, w2):
    # the stacks as [L * H, D]: the layer's rows are a dynamic_slice of the flat array
    f1, f2 = w1.reshape(L * H, D), w2.reshape(L * D, H)
    def body(x, i):
        a = jax.lax.dynamic_slice_in_dim(f1, i * H, H)
        b = jax.lax.dynamic_slice_in_dim(f2, i * D, D)
        return layer(x, a, b), None
    return jax.lax.scan(body, x, jnp.arange(L))[0]


def bench(name, f, *args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(50):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    print(f"{name:12s} {np.median(times) * 1e3:7.2f} ms  (first call {compile_s:.2f} s)")


w1s, w2s = [w1[i] for i in range(L)], [w2[i] for i in range(L)]
bench("scan_xs", scan_xs, x, w1, w2)
bench("fori_index", fori_index, x, w1, w2)
bench("scan_flat", scan_flat, x, w1, w2)
bench("unrolled", unrolled, x, w1s, w2s)
print("weights MB", (w1.nbytes + w2.nbytes) / 1e6)


@jax.jit
def unrolled_static_slices(x, w1, w2):
    for i in range(L):  # static slices of the stacks (what an unrolled model over stacked params does)
        x = layer(x, w1[i], w2[i])
    return x


bench("unrolled_st", unrolled_static_slices, x, w1, w2)
