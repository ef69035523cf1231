"""What every FP8 matmul implementation shares: the e4m3 range, the implementation names, the
argument check and the epilogue. The bottom of the family: it imports no other module of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["E4M3_MAX", "IMPLS", "on_gpu", "check_stacked", "scale_output", "pad_rows"]

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448.0

# The implementations a caller may name ("auto": the dispatcher picks one per backend and shape).
IMPLS = ("auto", "reference", "xla", "triton", "mgpu", "tpu")


def on_gpu(platform: str | None = None) -> bool:
    """Whether `platform` (default: JAX's default backend) is a GPU, where "auto" runs the GPU
    kernels and the Triton quantizer."""
    return (platform or jax.default_backend()) in ("gpu", "cuda")


def check_stacked(x: jax.Array, w: jax.Array, w_scale: jax.Array, layer):
    """The kernels' argument check. Returns (w [layers, n, k], w_scale [layers, n], layer [] i32):
    a plain w [n, k] becomes a stack of one, layer 0."""
    if layer is None:
        w, w_scale, layer = w[None], w_scale[None], 0
    if (x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[2]
            or w_scale.shape != w.shape[:2]):
        raise ValueError(f"fp8 matmul shapes: x {x.shape}, w {w.shape} (want [n, k] or [layers, n, k] with k "
                         f"{x.shape[-1]}), w_scale {w_scale.shape} (want [n] or [layers, n])")
    if w.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"w must be float8_e4m3fn, got {w.dtype}")
    return w, w_scale, jnp.asarray(layer, jnp.int32)


def scale_output(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array, out_dtype) -> jax.Array:
    """acc [m, n] f32 sums of e4m3 products -> y [m, n] out_dtype: both scales on the f32 values
    (x_scale [m, 1] first, then w_scale [n]), one cast. Every implementation ends this way."""
    return (acc * x_scale * w_scale.astype(jnp.float32)[None, :]).astype(out_dtype)


def pad_rows(x_q: jax.Array, x_scale: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """x_q [m, k], x_scale [m, 1] -> [rows, k], [rows, 1]: zero rows with scale 1, what quantizing
    a zero row gives, so a kernel whose row tiles overrun m reads no garbage."""
    m = x_q.shape[0]
    if rows == m:
        return x_q, x_scale
    return (jnp.pad(x_q, ((0, rows - m), (0, 0))),
            jnp.pad(x_scale, ((0, rows - m), (0, 0)), constant_values=1.0))
