"""Per-row dynamic FP8 quantization as one Pallas GPU kernel (Triton lowering), optionally fused
with the op that produces the rows; spec: `reference.quantize_rows` (after `activations`).

    x [m, k] bf16/f32 -> x_q [rows, k] float8_e4m3fn, x_scale [rows, 1] f32   (rows >= m)
    x_scale = max|x| / 448 per row (1 for a zero row); x_q = saturate(x / x_scale) in e4m3
    norm=scale [k]: the rows quantized are rms_norm(x, scale, eps)   (q, k, v; w1, w3 inputs)
    gate=g [m, k]:  the rows quantized are silu_mul(g, x)            (w2's input)
    rows past m:    zeros with scale 1, what quantizing a zero row gives (tile padding)

Why a kernel: XLA runs the quantization as two kernels (the row max as a reduce fusion, then
the division and cast as a loop fusion), pads x and its scales in two more, and does not fuse
the row max into the RMSNorm that produces x (the norm is two kernels of its own). At decode
each costs about a launch, and together they rival the small projections' products
(docs/performance.md). Here one program holds a whole row in registers: one read of the inputs,
one launch for norm, max, division and padding.

The quantization is IEEE f32 arithmetic, as `quantize_rows` is written: the max is exact, the
scale is `amax * (1/448)`, and x / x_scale is the correctly rounded f32 quotient (checked code
for code against NumPy on the GPU, where XLA's own quantize_rows is a few codes in tens of
millions off). Triton lowers an f32 `/` to the approximate `div.full.f32`, and the IEEE
`div.rn.f32` costs ~40 instructions, enough to make this kernel compute-bound; so on the GPU
each row's reciprocal r = 1/x_scale is taken once (`rcp.rn.f32`) and every element's quotient
q = x * r is corrected with two FMAs, e = x - x_scale * q (exact), q' = q + e * r: Markstein's
correctly rounded division. Interpret mode divides in XLA. The fused ops run the same jnp code
as the model (`activations`), rounding their output to x's dtype as written; XLA may add the
norm's sum in another order, or keep the op's output in f32 when it fuses it with the
quantization (excess precision), so a fused row can differ from XLA's by a bf16 ulp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.activations import rms_norm, silu_mul
from pallas_kernels.fp8_matmul.common import E4M3_MAX
from pallas_kernels.gpu_info import next_pow2

__all__ = ["MAX_K", "quantize_rows_triton"]

# Registers: one program holds a row of next_pow2(k) f32 values, this many per thread at most.
VALUES_PER_THREAD = 32
MAX_WARPS = 32
MAX_K = MAX_WARPS * 32 * VALUES_PER_THREAD  # 32,768: Mistral-Small's widest row (w2's input)


def _asm(asm: str, *args: jax.Array) -> jax.Array:
    """One f32 result per element from inline PTX over f32 arrays of one shape."""
    return plgpu.elementwise_inline_asm(asm, args=list(args), constraints="=r" + ",r" * len(args), pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])[0]


def _divide_rows(x: jax.Array, scale: jax.Array, interpret: bool) -> jax.Array:
    """x [kp] f32 / scale (one f32 value, shape [1]), correctly rounded (module docstring)."""
    if interpret:
        return x / scale
    r = jnp.broadcast_to(_asm("rcp.rn.f32 $0, $1;", scale), x.shape)
    s = jnp.broadcast_to(scale, x.shape)
    return _asm("{ .reg .f32 q, e; mul.rn.f32 q, $1, $3; neg.f32 e, q; fma.rn.f32 e, e, $2, $1; "
                "fma.rn.f32 $0, e, $3, q; }", x, s, r)


def _quantized(x: jax.Array, amax: jax.Array, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """x [kp] f32 (part of) a row whose max |x| is amax [1] -> (x_q [kp] e4m3, scale [1] f32), as
    quantize_rows computes them."""
    scale = jnp.where(amax > 0, amax * (1.0 / E4M3_MAX), 1.0)
    return jnp.clip(_divide_rows(x, scale, interpret), -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def _kernel(x_ref, *refs, m: int, k: int, kp: int, fused: str | None, stacked: bool, eps: float, interpret: bool):
    # One row: x_ref [m, k]; refs: the fused op's input (norm scale [k], or with `stacked` the
    # scales of every layer [layers, k] then the layer [1] i32; or gate [m, k]), then
    # q_ref [rows, k] e4m3 and s_ref [rows] f32 (rows >= m). This program's row: program_id(0).
    *extra, q_ref, s_ref = refs
    r = pl.program_id(0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (kp,), 0)
    col_ok = cols < k if kp != k else None  # [kp]: the row's power-of-two block runs past k
    row_ok = col_ok
    if q_ref.shape[0] > m:  # padding rows: nothing to read
        row_ok = jnp.broadcast_to(r < m, (kp,)) if col_ok is None else (r < m) & col_ok

    def load(ref, mask):  # -> [kp], zeros where masked
        return plgpu.load(ref, **({} if mask is None else dict(mask=mask, other=0.0)))

    x = load(x_ref.at[r, pl.ds(0, kp)], row_ok)
    if fused == "norm":
        norm_row = extra[0].at[extra[1][0], pl.ds(0, kp)] if stacked else extra[0].at[pl.ds(0, kp)]
        x = rms_norm(x, load(norm_row, col_ok), eps, k=k)
    elif fused == "gate":
        x = silu_mul(load(extra[0].at[r, pl.ds(0, kp)], row_ok), x)
    x = x.astype(jnp.float32)
    q, scale = _quantized(x, jnp.max(jnp.abs(x), keepdims=True), interpret)
    plgpu.store(q_ref.at[r, pl.ds(0, kp)], q, **({} if col_ok is None else dict(mask=col_ok)))
    plgpu.store(s_ref.at[pl.ds(r, 1)], scale)


# block_amax: elements per program (8 per thread of 4 warps), so a row of 32,768 is 32 programs.
BLOCK = 1024


def _blocks_kernel(x_ref, amax_ref, q_ref, s_ref, *, k: int, interpret: bool):
    # Program (r, c): block c of row r, x_ref [m, k] -> q_ref [m, k] e4m3; the row's scale from
    # its blocks' maxima amax_ref [m, nb] (-> s_ref [m], stored by block 0).
    r, c = pl.program_id(0), pl.program_id(1)
    nb = amax_ref.shape[1]
    nbp = next_pow2(nb)
    blocks_ok = jax.lax.broadcasted_iota(jnp.int32, (nbp,), 0) < nb
    amax = plgpu.load(amax_ref.at[r, pl.ds(0, nbp)], **({} if nbp == nb else dict(mask=blocks_ok, other=0.0)))
    cols = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
    ok = c * BLOCK + jax.lax.broadcasted_iota(jnp.int32, (BLOCK,), 0) < k
    x = plgpu.load(x_ref.at[r, cols], **(dict(mask=ok, other=0.0) if k % BLOCK else {})).astype(jnp.float32)
    q, scale = _quantized(x, jnp.max(amax, keepdims=True), interpret)  # the row's max |x|, exactly
    plgpu.store(q_ref.at[r, cols], q, **(dict(mask=ok) if k % BLOCK else {}))

    @pl.when(c == 0)
    def _():
        plgpu.store(s_ref.at[pl.ds(r, 1)], scale)


def _quantize_blocks(x: jax.Array, block_amax: jax.Array, interpret: bool) -> tuple[jax.Array, jax.Array]:
    m, k = x.shape
    if block_amax.ndim != 2 or block_amax.shape[0] != m:
        raise ValueError(f"quantize_rows_triton: block_amax must be [{m}, blocks] for x {x.shape}; "
                         f"got {block_amax.shape}")
    x_q, x_scale = pl.pallas_call(
        functools.partial(_blocks_kernel, k=k, interpret=interpret),
        grid=(m, pl.cdiv(k, BLOCK)),
        out_shape=(jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="quantize_blocks",
    )(x, block_amax.astype(jnp.float32))
    return x_q, x_scale[:, None]


@functools.partial(jax.jit, static_argnames=("rows", "eps", "interpret"))
def quantize_rows_triton(x: jax.Array, *, rows: int | None = None, norm: jax.Array | None = None, eps: float = 0.0,
                         gate: jax.Array | None = None, layer: jax.Array | None = None,
                         block_amax: jax.Array | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [m, k] -> (x_q [rows, k] float8_e4m3fn, x_scale [rows, 1] f32): `quantize_rows` of x, or
    of rms_norm(x, norm, eps) (norm [k]), or of silu_mul(gate, x) (gate [m, k]), in one launch
    (one program per row), padded to `rows` (default m) as `pad_rows` would.
    layer: norm holds every layer's scales [layers, k] and the kernel reads row `layer` in place
    (a model's stacked norms: a slice handed to a custom call is copied first, one more
    memcpy per norm in every layer of every step).
    block_amax: [m, blocks] the max |x| of each row's blocks, taken by the kernel that produced x
    (fp8_swiglu_triton): no row max is left to take, so the quantization spreads over the row
    (one program per BLOCK elements) instead of one program per row (no norm=, gate= or rows=).
    `interpret=True` runs in Pallas interpret mode (CPU)."""
    if x.ndim != 2:
        raise ValueError(f"quantize_rows_triton wants x [m, k]; got shape {x.shape}")
    if block_amax is not None:
        if norm is not None or gate is not None or (rows or x.shape[0]) != x.shape[0]:
            raise ValueError("quantize_rows_triton: block_amax= quantizes x as it is (no norm=, gate= or rows=)")
        return _quantize_blocks(x, block_amax, interpret)
    m, k = x.shape
    rows = m if rows is None else rows
    if rows < m:
        raise ValueError(f"quantize_rows_triton: rows={rows} is fewer than x's {m}")
    if norm is not None and gate is not None:
        raise ValueError("quantize_rows_triton fuses one op: norm= or gate=, not both")
    norm_shape = (k,) if layer is None else (None, k)
    if (norm is not None and (norm.ndim != len(norm_shape) or norm.shape[-1] != k)) or (
            gate is not None and gate.shape != x.shape):
        raise ValueError(f"quantize_rows_triton: x {x.shape} wants norm [{k}] (with layer=, [layers, {k}]) or "
                         f"gate {x.shape}; got {None if norm is None else norm.shape}, "
                         f"{None if gate is None else gate.shape}")
    if layer is not None and norm is None:
        raise ValueError("quantize_rows_triton: layer= picks a row of a stacked norm=; no norm was given")
    kp = next_pow2(k)
    if kp > MAX_K:
        raise ValueError(f"quantize_rows_triton holds a row in registers: k={k} is over {MAX_K}; "
                         f"use fp8_matmul.quantize_rows")
    fused, extra = ("norm", (norm,)) if norm is not None else ("gate", (gate,)) if gate is not None else (None, ())
    if layer is not None:
        extra += (jnp.reshape(layer, (1,)).astype(jnp.int32),)
    x_q, x_scale = pl.pallas_call(
        functools.partial(_kernel, m=m, k=k, kp=kp, fused=fused, stacked=layer is not None, eps=float(eps),
                          interpret=interpret),
        grid=(rows,),
        out_shape=(jax.ShapeDtypeStruct((rows, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((rows,), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=max(4, min(MAX_WARPS, kp // (32 * VALUES_PER_THREAD))),
                                             num_stages=1),
        interpret=interpret,
        name="quantize_rows",
    )(x, *extra)
    return x_q, x_scale[:, None]
