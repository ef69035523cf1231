"""W8A8 FP8 matmul, the family's one entry point: `fp8_matmul` (and its grouped and SwiGLU
forms) runs the implementation `impl` names, a Pallas kernel or a jnp twin of the same function.

    reference.py             the plain-jnp spec (read its docstring for the math) and XLA's fp8 dot
    triton.py                Pallas GPU (Triton lowering): decode, grouped weights, fused SwiGLU
    mgpu.py                  Pallas Mosaic GPU (wgmma + TMA): above GPU_TRITON_MAX_M rows
    tpu.py                   Pallas TPU
    quantize_rows_triton.py  per-row quantization (fused with RMSNorm or silu_mul) in one kernel
    quantize.py              quantize_input: that kernel on the GPU, the jnp twin elsewhere
    common.py                names, argument check, epilogue: what every implementation shares

Imports run downwards only: this dispatcher imports the kernels (when it runs them), the
kernels import quantize, reference and common, never this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul.common import E4M3_MAX, IMPLS, check_stacked, on_gpu, pad_rows, scale_output
from pallas_kernels.fp8_matmul.quantize import quantize_input
from pallas_kernels.fp8_matmul.reference import (
    fp8_matmul_reference,
    fp8_matmul_xla,
    quantize_rows,
    quantize_unless,
    quantize_weight,
)

__all__ = ["E4M3_MAX", "IMPLS", "GPU_TRITON_MAX_M", "quantize_rows", "quantize_input", "quantize_unless",
           "quantize_weight", "fp8_matmul_reference", "fp8_matmul_xla", "fp8_matmul", "fp8_matmul_group",
           "fp8_swiglu", "check_stacked", "scale_output", "pad_rows", "pads_rows", "default_impl", "describe_impl"]


# GPU: up to this many rows the Triton kernel streams the weights fastest (decode); above it the
# Mosaic GPU wgmma kernel runs the product (64-row tiles up to 64 rows, wider ones for prefill,
# where wgmma outruns the Triton lowering's fp8 dot), and XLA's fp8 dot a shape that kernel does
# not tile. Grouped launches (w1 and w3) follow the same rule: above it two wgmma launches beat
# one grouped Triton launch; grouping pays only for narrow weights, and q, k and v are one
# weight now. The measurements behind the threshold: docs/performance.md.
GPU_TRITON_MAX_M = 32


def default_impl(platform: str | None = None, m: int | None = None, n: int | None = None,
                 k: int | None = None) -> str:
    """The implementation for a backend and an [m, k] @ [k, n] product: on GPU the Triton kernel
    for decode (m <= GPU_TRITON_MAX_M) and the Mosaic GPU kernel above (XLA's fp8 dot where n or
    k does not fit its tiles); Pallas TPU on TPU; XLA's dot elsewhere."""
    platform = platform or jax.default_backend()
    if on_gpu(platform):
        if m is None or m <= GPU_TRITON_MAX_M:
            return "triton"
        from pallas_kernels.fp8_matmul.mgpu import supports

        return "mgpu" if n is None or k is None or supports(m, n, k) else "xla"
    return {"tpu": "tpu"}.get(platform, "xla")


def pads_rows(m: int, n: int, k: int, impl: str = "auto") -> bool:
    """Whether `impl` copies x into more rows than m for an [m, k] @ [k, n] product: the wgmma
    kernel pads m to its tile's rows. Quantizing x inside the product then pads in the same
    launch; an x quantized before (quantize_input) costs one more copy of it (a few percent of a
    long prefill: docs/performance.md)."""
    if (default_impl(m=m, n=n, k=k) if impl == "auto" else impl) != "mgpu":
        return False
    from pallas_kernels.fp8_matmul.mgpu import choose_tiles

    return m % choose_tiles(m, n, k).cta_m != 0


def describe_impl(impl: str = "auto", platform: str | None = None) -> str:
    """What `impl` runs on a backend, for logs: "auto" on GPU names both regimes."""
    if impl != "auto":
        return impl
    small, large = default_impl(platform, 1), default_impl(platform, GPU_TRITON_MAX_M + 1)
    if small == large:
        return small
    return f"{small} up to {GPU_TRITON_MAX_M} tokens, {large} above"


def _check_args(impl: str, w: jax.Array, layer) -> None:
    if impl not in IMPLS:
        raise ValueError(f"fp8 matmul impl {impl!r} is not one of {IMPLS}")
    if (w.ndim == 3) != (layer is not None):
        raise ValueError(f"fp8 matmul: w {w.shape} needs layer= exactly when it is stacked [layers, n, k]")


def fp8_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, layer: jax.Array | int | None = None,
               x_scale: jax.Array | None = None, impl: str = "auto", out_dtype=jnp.bfloat16,
               interpret: bool = False) -> jax.Array:
    """y [m, n] = quant(x [m, k]) @ (w [n, k] e4m3 * w_scale [n]).T by the implementation `impl`
    (see the module docstring). `interpret=True` runs a Pallas kernel in interpret mode.

    layer: with w [layers, n, k] and w_scale [layers, n] (a model's stacked weights), the product
    with layer `layer` (an int32 scalar, traced or not). The Pallas kernels read that layer from
    the stack in place; slicing it outside would make XLA copy the layer's weight into a buffer
    of its own first (a custom call cannot take a view), which costs more than the product.

    x_scale: [m, 1] f32 when x comes quantized already (e4m3); the per-row step is skipped."""
    _check_args(impl, w, layer)
    if impl == "auto":
        impl = default_impl(m=x.shape[0], n=w.shape[-2], k=w.shape[-1])
    if impl in ("reference", "xla"):
        if layer is not None:
            w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
            w_scale = jax.lax.dynamic_index_in_dim(w_scale, layer, keepdims=False)
        twin = fp8_matmul_reference if impl == "reference" else fp8_matmul_xla
        return twin(x, w, w_scale, x_scale=x_scale, out_dtype=out_dtype)
    if impl == "mgpu":  # compiled for the GPU only: no interpret mode (see its module)
        from pallas_kernels.fp8_matmul.mgpu import fp8_matmul_mgpu

        return fp8_matmul_mgpu(x, w, w_scale, layer=layer, x_scale=x_scale, out_dtype=out_dtype)
    if impl == "triton":
        from pallas_kernels.fp8_matmul.triton import fp8_matmul_triton as kernel
    else:
        from pallas_kernels.fp8_matmul.tpu import fp8_matmul_tpu as kernel
    return kernel(x, w, w_scale, layer=layer, x_scale=x_scale, out_dtype=out_dtype, interpret=interpret)


def fp8_matmul_group(x: jax.Array, ws, w_scales, *, layer: jax.Array | int | None = None,
                     x_scale: jax.Array | None = None, impl: str = "auto", out_dtype=jnp.bfloat16,
                     interpret: bool = False) -> tuple[jax.Array, ...]:
    """fp8_matmul of one x with several weights (a layer's q, k, v; or w1, w3): one y per weight.
    The Triton kernel does them in one launch (x quantized once, its n tiles spread over every
    weight): at decode the small projections are bound by per-launch cost, not bytes. Other
    implementations run one product per weight ("auto" picks per weight), x quantized once."""
    for w in ws:
        _check_args(impl, w, layer)
    if (default_impl(m=x.shape[0]) if impl == "auto" else impl) == "triton":
        from pallas_kernels.fp8_matmul.triton import fp8_matmul_group_triton

        return fp8_matmul_group_triton(x, tuple(ws), tuple(w_scales), layer=layer, x_scale=x_scale,
                                       out_dtype=out_dtype, interpret=interpret)
    m, k = x.shape
    if x_scale is None and len(ws) > 1 and not any(pads_rows(m, w.shape[-2], k, impl) for w in ws):
        x, x_scale = quantize_input(x, impl=impl, interpret=interpret)  # once for all (no padding copy)
    return tuple(fp8_matmul(x, w, s, layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype,
                            interpret=interpret) for w, s in zip(ws, w_scales))


def fp8_swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, s1: jax.Array, s3: jax.Array, *,
               layer: jax.Array | int | None = None, x_scale: jax.Array | None = None, impl: str = "auto",
               out_dtype=jnp.bfloat16, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """SwiGLU's hidden activation, quantized per token for w2: (h_q [m, n] e4m3, h_scale [m, 1]
    f32) = quantize_rows(silu_mul(g, u)), where g = fp8_matmul(x, w1, s1) and u = fp8_matmul(x,
    w3, s3) in out_dtype (w1, w3 [(layers,) n, k]; layer, x_scale as fp8_matmul's).
    Where `impl` is the Triton kernel (GPU decode), the products and silu_mul are one launch and
    the quantization spreads over each row (fp8_swiglu_triton); elsewhere, or where that kernel
    would split K, the products (fp8_matmul_group) then the quantizer fused with silu_mul
    (quantize_input's gate=): the twin, the same function."""
    for w in (w1, w3):
        _check_args(impl, w, layer)
    if (default_impl(m=x.shape[0]) if impl == "auto" else impl) == "triton":
        from pallas_kernels.fp8_matmul.triton import fp8_swiglu_triton

        out = fp8_swiglu_triton(x, w1, w3, s1, s3, layer=layer, x_scale=x_scale, out_dtype=out_dtype,
                                interpret=interpret)
        if out is not None:
            return out
    gate, up = fp8_matmul_group(x, (w1, w3), (s1, s3), layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype,
                                interpret=interpret)
    return quantize_input(up, gate=gate, impl=impl, interpret=interpret)
