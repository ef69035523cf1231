"""What produces a projection's input: RMSNorm, and SwiGLU's silu(gate) * up, in plain jnp.

These are the model's own definitions (mistral_jax.model.transformer uses them), kept here so that the fused
FP8 quantizer (`quantize_rows_triton` with `norm=` or `gate=`) runs the very same jnp code on the
rows it loads, and its reference twin is simply one of these followed by `quantize_rows`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["rms_norm", "silu_mul"]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, k: int | None = None) -> jax.Array:
    """x [..., k] normalized by its root mean square over the last axis, times scale [k].
    Normalizes in f32 and casts back before the scale (what the reference implementation does).
    k: the row's true length when x is a zero-padded block of it (a kernel's power-of-two row)."""
    xf = x.astype(jnp.float32)
    mean_sq = jnp.sum(xf * xf, axis=-1, keepdims=True) * (1.0 / (k or x.shape[-1]))
    return scale * (xf * jax.lax.rsqrt(mean_sq + eps)).astype(x.dtype)


def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's hidden activation: silu(gate) * up, elementwise, in the inputs' dtype. Written out
    op by op (each computed in f32 and rounded to that dtype) because Triton has no bf16
    division: the same values as jax.nn.silu(gate) * up, whose sigmoid XLA expands into
    neg, exp, add and divide, each rounded to bf16."""
    f32 = jnp.float32

    def rounded(v):
        return v.astype(up.dtype).astype(f32)

    g = gate.astype(f32)
    sigmoid = rounded(1.0 / rounded(rounded(jnp.exp(rounded(-g))) + 1.0))
    return (rounded(g * sigmoid) * up.astype(f32)).astype(up.dtype)
