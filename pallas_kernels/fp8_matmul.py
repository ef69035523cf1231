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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["E4M3_MAX", "quantize_rows", "quantize_input", "quantize_unless", "quantize_weight", "fp8_matmul_reference",
           "fp8_matmul_xla", "fp8_matmul", "fp8_matmul_group", "fp8_swiglu", "check_stacked", "scale_output", "pad_rows",
           "pads_rows"]

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448.0


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


# --------------------------------------------------------------------------------------------
# The one entry point: the model calls this; `impl` picks a kernel or a twin.
# --------------------------------------------------------------------------------------------

IMPLS = ("auto", "reference", "xla", "triton", "mgpu", "tpu")


# GPU: up to this many rows the Pallas/Triton kernel streams the weights fastest (decode); above
# it the Mosaic GPU wgmma kernel runs the product: from 33 to 64 rows with 64-row tiles (at 64
# rows 1.05-1.39x the Triton kernel's device time), for prefill at ~1,000 TFLOP/s on an H100
# against the Triton kernel's ~490; XLA's fp8 dot for a shape that kernel does not tile
# (benchmarks/NOTES.md, 2026-11-23 and 2026-11-24). Grouped launches (w1 and w3) follow the same
# rule: grouping paid off at 64 rows only for q, k and v (narrow), which are one weight now; at
# 64 rows on an H200, w1 + w3 took 118 µs of device time in one Triton launch against 88 µs as
# two wgmma launches (benchmarks/results/2026-12-04_h200_s19_fp8_rows/).
GPU_TRITON_MAX_M = 32


def default_impl(platform: str | None = None, m: int | None = None, n: int | None = None,
                 k: int | None = None) -> str:
    """The implementation for a backend and an [m, k] @ [k, n] product: on GPU the Triton kernel
    for decode (m <= GPU_TRITON_MAX_M) and the Mosaic GPU kernel above (XLA's fp8 dot where n or
    k does not fit its tiles); Pallas TPU on TPU; XLA's dot elsewhere."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda"):
        if m is None or m <= GPU_TRITON_MAX_M:
            return "triton"
        from .fp8_matmul_mgpu import supports

        return "mgpu" if n is None or k is None or supports(m, n, k) else "xla"
    return {"tpu": "tpu"}.get(platform, "xla")


def pads_rows(m: int, n: int, k: int, impl: str = "auto") -> bool:
    """Whether `impl` copies x into more rows than m for an [m, k] @ [k, n] product: the wgmma
    kernel pads m to its tile's rows. Quantizing x inside the product then pads in the same
    launch; an x quantized before (quantize_input) costs one more copy of it (at 4,096 tokens
    ~5% of a prefill: benchmarks/results/2026-11-24_h100_fp8_fused/)."""
    if (default_impl(m=m, n=n, k=k) if impl == "auto" else impl) != "mgpu":
        return False
    from .fp8_matmul_mgpu import choose_tiles

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
        from .fp8_matmul_mgpu import fp8_matmul_mgpu

        return fp8_matmul_mgpu(x, w, w_scale, layer=layer, x_scale=x_scale, out_dtype=out_dtype)
    if impl == "triton":
        from .fp8_matmul_triton import fp8_matmul_triton as kernel
    else:
        from .fp8_matmul_tpu import fp8_matmul_tpu as kernel
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
        from .fp8_matmul_triton import fp8_matmul_group_triton

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
        from .fp8_matmul_triton import fp8_swiglu_triton

        out = fp8_swiglu_triton(x, w1, w3, s1, s3, layer=layer, x_scale=x_scale, out_dtype=out_dtype,
                                interpret=interpret)
        if out is not None:
            return out
    gate, up = fp8_matmul_group(x, (w1, w3), (s1, s3), layer=layer, x_scale=x_scale, impl=impl, out_dtype=out_dtype,
                                interpret=interpret)
    return quantize_input(up, gate=gate, impl=impl, interpret=interpret)


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
    from .quantize_rows_triton import MAX_K, quantize_rows_triton

    if (default_impl() if impl == "auto" else impl) in ("triton", "mgpu") and x.shape[-1] <= MAX_K:
        return quantize_rows_triton(x, norm=norm, eps=eps, gate=gate, layer=layer, rows=rows, interpret=interpret)
    from .activations import rms_norm, silu_mul

    if layer is not None and norm is not None:
        norm = jax.lax.dynamic_index_in_dim(norm, layer, keepdims=False)

    h = rms_norm(x, norm, eps) if norm is not None else silu_mul(gate, x) if gate is not None else x
    return pad_rows(*quantize_rows(h), rows or x.shape[0])
