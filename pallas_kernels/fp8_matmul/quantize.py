"""A W8A8 product's activation step: the Triton quantizer (quantize_rows_triton) on the GPU, its
jnp twin (activations, then reference.quantize_rows) elsewhere. Below the matmul kernels, which
quantize through here, and above the quantizer kernel and the reference."""

from __future__ import annotations

import jax

from pallas_kernels.activations import rms_norm, silu_mul
from pallas_kernels.fp8_matmul.common import IMPLS, on_gpu, pad_rows
from pallas_kernels.fp8_matmul.reference import quantize_rows

__all__ = ["quantize_input"]


def quantize_input(x: jax.Array, *, norm: jax.Array | None = None, eps: float = 0.0, gate: jax.Array | None = None,
                   layer: jax.Array | None = None, rows: int | None = None, impl: str = "auto",
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """A W8A8 product's activation step, with the op that produces x fused in: (x_q [m, k] e4m3,
    x_scale [m, 1] f32) = quantize_rows(h), h = x, or rms_norm(x, norm, eps) (norm [k]), or
    silu_mul(gate, x) (gate [m, k]); fp8_matmul takes the pair as x=x_q, x_scale=x_scale.
    layer: norm is a stack [layers, k] and layer `layer` applies (the kernel reads it in place).
    rows: pad the result to that many rows, as pad_rows does (a kernel's row tiles).
    Where `impl` runs on the GPU ("auto" there, "triton", "mgpu") this is one Triton kernel
    (quantize_rows_triton; rows up to its MAX_K), instead of XLA's 3-5 small kernels; elsewhere
    the jnp twin. Every GPU path quantizes through here."""
    if impl not in IMPLS:
        raise ValueError(f"fp8 matmul impl {impl!r} is not one of {IMPLS}")
    from pallas_kernels.fp8_matmul.quantize_rows_triton import MAX_K, quantize_rows_triton

    # "auto" is the GPU kernels exactly where the backend is a GPU (the dispatcher's default_impl).
    if (on_gpu() if impl == "auto" else impl in ("triton", "mgpu")) and x.shape[-1] <= MAX_K:
        return quantize_rows_triton(x, norm=norm, eps=eps, gate=gate, layer=layer, rows=rows, interpret=interpret)

    if layer is not None and norm is not None:
        norm = jax.lax.dynamic_index_in_dim(norm, layer, keepdims=False)

    h = rms_norm(x, norm, eps) if norm is not None else silu_mul(gate, x) if gate is not None else x
    return pad_rows(*quantize_rows(h), rows or x.shape[0])
