"""One lever on its own (issue 19): SwiGLU's w1, w3 products and the quantization of silu(g) * u
for w2, at decode rows, on the GPU. Two ways, alternated in one process, each a 40-layer scan
over Mistral-Small-2501's stacked random FP8 w1/w3 ([40, 32768, 5120] each), x quantized:
  split: fp8_matmul_group (one Triton launch for both) + quantize_input(gate=) (one program per row)
  fused: fp8_swiglu_triton (both products and silu_mul in one launch) + the block quantizer
Prints ms per 40 layers (median of reps) and the weights' streaming rate (13.4 GB per scan)."""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul import fp8_matmul_group, quantize_input
from pallas_kernels.fp8_matmul.triton import fp8_swiglu_triton

L, N, K = 40, 32768, 5120


def weights():
    def draw(key):
        return jax.random.randint(key, (L, N, K), -100, 100, jnp.int8).astype(jnp.float8_e4m3fn) * 0.01

    w1 = jax.jit(draw)(jax.random.key(1)).astype(jnp.float8_e4m3fn)
    w3 = jax.jit(draw)(jax.random.key(2)).astype(jnp.float8_e4m3fn)
    s = jnp.full((L, N), 0.01, jnp.float32)
    return w1, w3, s


def scan(kind, m):
    def body(carry, layer):
        x_q, x_s, w1, w3, s = carry
        if kind == "split":
            g, u = fp8_matmul_group(x_q, (w1, w3), (s, s), layer=layer, x_scale=x_s)
            q, sc = quantize_input(u, gate=g)
        else:
            q, sc = fp8_swiglu_triton(x_q, w1, w3, s, s, layer=layer, x_scale=x_s)
        # the next layer's x depends on this one's output (a chain, as in the model)
        return (x_q, x_s * (1 + sc[:, :1] * 0), w1, w3, s), q[:, :4]

    @jax.jit
    def run(x_q, x_s, w1, w3, s):
        return jax.lax.scan(body, (x_q, x_s, w1, w3, s), jnp.arange(L, dtype=jnp.int32))[1]
    return run


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,8,16,32").split(",")]
    w1, w3, s = weights()
    for m in ms:
        x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
        x_q, x_s = quantize_input(x)
        runs = {kind: scan(kind, m) for kind in ("split", "fused")}
        for fn in runs.values():
            fn(x_q, x_s, w1, w3, s).block_until_ready()
        times = {kind: [] for kind in runs}
        for _ in range(15):
            for kind, fn in runs.items():
                t = time.perf_counter()
                fn(x_q, x_s, w1, w3, s).block_until_ready()
                times[kind].append(time.perf_counter() - t)
        for kind, ts in times.items():
            t = statistics.median(ts)
            print(f"m={m:3d} {kind:6s} {t * 1e3:7.3f} ms / 40 layers = {t / L * 1e6:6.1f} us/layer, "
                  f"{2 * L * N * K / t / 1e12:5.2f} TB/s of w1+w3")


if __name__ == "__main__":
    main()
