"""W8A8 FP8 matmul: the plain-`jnp` reference (the spec the Pallas kernels must match).

    y = (quant(x) @ w.T) * x_scale * w_scale

    x        [m, k]  bf16 or f32 activations, quantized here per row (dynamic, per token)
    w        [n, k]  float8_e4m3fn weights, stored [out, in] as checkpoints store Linear weights
                     (fp8 wgmma wants its right operand [N, K]; the math is x @ W with W = w.T)
    w_scale  [n]     f32, one scale per output channel: W_real[:, j] = w[j, :] * w_scale[j]
    y        [m, n]  out_dtype (bf16 by default)

Activation quantization (llm-compressor's "FP8 dynamic" scheme, as vLLM runs it): per row,
x_scale = max|x| / 448 (448 = largest finite e4m3), x_q = saturate(x / x_scale) cast to e4m3
with round-to-nearest-even. A row of zeros gets scale 1 (its x_q is zeros, so y's row is 0).
The product of e4m3 values is exact in f32; the k-sum accumulates in f32; both scales apply
to the f32 accumulator before the one cast to out_dtype.

Also here: the same product through XLA's native fp8 dot (`fp8_matmul_xla`), the peer the
kernels must beat, and the quantization steps the kernels share (`quantize_unless`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul.common import E4M3_MAX, scale_output

__all__ = ["quantize_rows", "quantize_weight", "quantize_unless", "fp8_matmul_reference", "fp8_matmul_xla"]


def quantize_rows(x: jax.Array, row_max=None) -> tuple[jax.Array, jax.Array]:
    """x [m, k] -> (x_q [m, k] float8_e4m3fn, x_scale [m, 1] f32), one scale per row.
    row_max: applied to the [m, 1] max |x| before the scale is taken (a pmax when x holds only
    part of each row, so every part gets the whole row's scale)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    if row_max is not None:
        amax = row_max(amax)
    # amax * (1/448), not amax / 448: what XLA compiles the division by a constant to anyway,
    # written out so that every implementation (the Triton quantizer too) rounds alike.
    scale = jnp.where(amax > 0, amax * (1.0 / E4M3_MAX), 1.0)
    x_q = jnp.clip(xf / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return x_q, scale


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A 16/32-bit Linear weight w [n, k] -> (w_q [n, k] float8_e4m3fn, w_scale [n] f32),
    one scale per output channel (row of w): quantization at load time."""
    w_q, scale = quantize_rows(w)
    return w_q, scale[:, 0]


def quantize_unless(x: jax.Array, x_scale: jax.Array | None, quantize=None) -> tuple[jax.Array, jax.Array]:
    """(x_q [m, k] e4m3, x_scale [m, 1] f32): x quantized per row (by `quantize`, a twin of
    quantize_rows, when given), or x as given when its scales come with it (quantized by the
    caller, e.g. with a row max taken across tp shards)."""
    if x_scale is None:
        return (quantize or quantize_rows)(x)
    if x.dtype != jnp.float8_e4m3fn or x_scale.shape != (x.shape[0], 1):
        raise ValueError(f"pre-quantized x must be float8_e4m3fn [m, k] with x_scale [m, 1]; "
                         f"got x {x.dtype} {x.shape}, x_scale {x_scale.shape}")
    return x, x_scale.astype(jnp.float32)


def fp8_matmul_reference(x: jax.Array, w: jax.Array, w_scale: jax.Array, *,
                         x_scale: jax.Array | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """x [m, k] @ (w [n, k] * w_scale[:, None]).T with x quantized per row; see module docstring."""
    m, k = x.shape
    n, k2 = w.shape
    if k != k2 or w_scale.shape != (n,):
        raise ValueError(f"fp8 matmul shapes: x {x.shape}, w {w.shape} (want [n, {k}]), "
                         f"w_scale {w_scale.shape} (want [{n}])")
    x_q, x_scale = quantize_unless(x, x_scale)
    acc = jax.lax.dot_general(x_q.astype(jnp.float32), w.astype(jnp.float32),
                              (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    return scale_output(acc, x_scale, w_scale, out_dtype)


def fp8_matmul_xla(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, x_scale: jax.Array | None = None,
                   out_dtype=jnp.bfloat16) -> jax.Array:
    """The same function through XLA's native fp8 dot (the peer our kernels must beat)."""
    x_q, x_scale = quantize_unless(x, x_scale)
    acc = jax.lax.dot_general(x_q, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return scale_output(acc, x_scale, w_scale, out_dtype)
