"""W8A8 FP8 matmul as a Pallas GPU kernel (Triton lowering); spec: `reference.py`.

    y [m, n] = (quant(x) [m, k] @ w [n, k].T) * x_scale [m, 1] * w_scale [n]

Design
------
* Activation quantization is a separate small jnp step (`quantize_rows`) before the kernel, not
  fused: the per-row amax spans all of K, while a program sees one K block at a time, so a fused
  kernel would need a second pass over x in every one of the n/BN column programs. The separate
  step reads x once (m*k, tiny next to the n*k weight bytes in decode) and is bit-identical to
  the reference's quantization (or skipped when the caller passes x already quantized with its
  scales). On the GPU that step is one Triton kernel of its own (`quantize_rows_triton`; XLA
  would run it as two). x is not padded to a multiple of BM: loads of its last row tile are
  masked (padding x and its scales were two more small kernels per product at decode).
* Grid (m tiles, n tiles, k splits). A program loads x_q [BM, BK] and w [BN, BK] fp8 blocks and
  accumulates `dot(x, w.T)` in f32 over its K blocks (fp8 x fp8 -> f32 on the tensor cores).
  K blocks wholly inside k run unmasked; only the ragged tail block (static: k % BK != 0) is
  loaded with mask / other=0.0, so masked-out k terms are exact zeros (an e4m3fn NaN byte in
  the padding could otherwise poison the sum). `other` is a float: Triton lowering casts it to
  e4m3 with fp_to_fp, and has no int -> fp8 cast. w rows >= n are masked the same way (static:
  n % BN != 0).
* Stacked weights: the model keeps each projection as one [layers, n, k] array and runs its
  layers in a scan. Handed a slice, XLA would first copy that layer's weight into a buffer of
  its own (a custom call takes no views), which costs more than the product itself
  (docs/performance.md). So the kernel takes the whole stack as [layers * n, k] plus the
  layer index (a [1] i32 operand) and starts its weight rows at layer * n; the scales' stack
  [layers * n] likewise.
* Stacks of 2-4 GiB: Pallas's Triton lowering addresses an array of at most 4 GiB with i32
  element offsets, which wrap negative past 2 GiB of 1-byte elements
  (`gpu_info.triton_offsets_overflow`). Mistral-Small-2501's w1, w3 and w2 stacks split over
  tp=2 are 3.36 GB per GPU: their last layers were read from before the buffer (CUDA's illegal
  address, issue 22). Such a stack goes in as uint16 pairs of e4m3 bytes [layers * n, k / 2] (an
  XLA bitcast, no copy), so that no offset passes 2**31, and each block is split back into its
  bytes in registers (a Triton join: low byte first, as the pair was stored).
* Epilogue: both scales apply to the f32 accumulator ((acc * x_scale) * w_scale, the
  reference's order), one cast to out_dtype, masked store of rows < m and columns < n.
* Several weights of one x (a layer's q, k, v; w1, w3) can share one launch
  (`fp8_matmul_group_triton`): the grid's n tiles run through the weights in turn, each weight
  with its own refs, scales and output. At decode a small projection's product streams its
  weight in about the time a launch costs, so sharing the launch pays (docs/performance.md).
* SwiGLU (`fp8_swiglu_triton`, decode): one program takes the same tile of w1 and w3 (two
  accumulators over one x block stream) and runs silu_mul in the epilogue, writing h and each
  row's max |h| over the tile; the quantization of h for w2 then needs no row pass of its own
  (quantize_rows_triton's block_amax). Only where the plan does not split K.
* Split-K (decode): with few (m, n) tiles the SMs would idle while streaming the weights, so
  K is cut into `split_k` contiguous ranges of whole blocks; each program writes its raw f32
  partial sum [split_k, m, n], and XLA adds them and applies the scales (a tiny epilogue when
  m is small, the only case `plan` splits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.activations import silu_mul
from pallas_kernels.fp8_matmul.common import check_stacked, scale_output
from pallas_kernels.fp8_matmul.quantize import quantize_input
from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton
from pallas_kernels.fp8_matmul.reference import quantize_unless
from pallas_kernels.gpu_info import DEFAULT_SMS, next_pow2, num_sms, triton_offsets_overflow

__all__ = ["fp8_matmul_triton", "fp8_matmul_group_triton", "fp8_swiglu_triton", "plan"]


def plan(m: int, n: int, k: int, *, block_m: int | None = None, block_n: int | None = None,
         block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None, sms: int | None = None) -> dict:
    """Static tiling for one (m, n, k); any explicit argument overrides the heuristic (sweeps).

    Decode (m <= 256): a small BM (tensor-core dots need >= 16 rows), wide BK to stream long
    contiguous weight rows (narrower at 17-32 rows of a wide n), split-K when the (m, n) tiles
    alone cannot fill the SMs.
    Prefill (m > 256): 128 x 128 x 128 tiles, 8 warps, no split.
    """
    if m <= 256:
        bm = block_m or min(64, max(16, next_pow2(m)))
        bn = block_n or (64 if m <= 64 else 128)
        if m <= 16 and not block_n and -(-n // bn) < 2 * (sms or num_sms()):
            # A narrow product at decode (q/k/v, o, w2 of 2501), which splits K anyway: 32-wide
            # n tiles, so that more of them and fewer K splits fill the SMs.
            bn = 32
        bk = block_k or 256
        warps = num_warps or 4
        # SMEM per stage is (BM + BN) * BK bytes: 4 stages of 64 + 128 rows would be 192 KiB.
        stages = num_stages or (4 if m <= 64 else 3)
        if 16 < m <= 32 and -(-n // bn) >= 4 * (sms or num_sms()):
            # 32-row tiles of a wide product (w1 + w3: 1,024 n tiles, no split): 128 x 128
            # blocks, 5 stages, faster there; every other shape was as fast or faster with the
            # 64 x 256 blocks (docs/performance.md).
            bn, bk, stages = block_n or 128, block_k or 128, num_stages or 5
    else:
        bm, bn, bk = block_m or 128, block_n or 128, block_k or 128
        warps = num_warps or 8
        stages = num_stages or 3
    bk = max(32, min(bk, next_pow2(k)))  # fp8 mma wants K >= 32; don't over-pad tiny k
    bn = max(16, min(bn, next_pow2(n)))
    k_blocks = -(-k // bk)
    if split_k is None:
        tiles = -(-m // bm) * -(-n // bn)
        target = 2 * (sms or num_sms())  # ~2 waves
        # Split only small-m products (the f32 partials cost split*m*n*4 bytes) and keep
        # >= 4 K blocks per split so the pipeline has something to overlap.
        split_k = 1
        if m <= 256 and tiles < target:
            split_k = max(1, min(-(-target // tiles), k_blocks // 4, 16))
    split_k = max(1, min(split_k, k_blocks))
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=split_k, num_warps=warps,
                num_stages=stages)


def _block_mask(rows_ok=None, cols_ok=None, other=0.0) -> dict:
    """plgpu.load's mask arguments for a [rows, cols] block (rows_ok [rows], cols_ok [cols]; None:
    all in range): {} for an unmasked load, else `other` (zero) out of range. For e4m3 blocks
    `other` is a float: Triton lowering casts it to e4m3 with fp_to_fp (it has no int -> fp8
    cast); for uint16 pairs, an int."""
    if rows_ok is None and cols_ok is None:
        return {}
    if cols_ok is None:
        return dict(mask=rows_ok[:, None], other=other)
    return dict(mask=cols_ok[None, :] if rows_ok is None else rows_ok[:, None] & cols_ok[None, :], other=other)


def _vector_mask(ok=None) -> dict:
    """_block_mask for a vector block (ok [len]; None: all in range)."""
    return {} if ok is None else dict(mask=ok, other=0.0)


def as_pairs(w: jax.Array) -> jax.Array:
    """e4m3 w [rows, k] (k even) -> uint16 [rows, k / 2]: each pair of bytes as one element, the
    byte at the even k in the low half (XLA bitcasts; no copy)."""
    rows, k = w.shape
    return lax.bitcast_convert_type(lax.bitcast_convert_type(w, jnp.uint8).reshape(rows, k // 2, 2), jnp.uint16)


def _load_w(w_ref, w_row, b, rows_ok, *, k_tail: bool, k: int, bn: int, bk: int, pairs: bool) -> jax.Array:
    """Weight block [BN, BK] e4m3 at stack row w_row, K block b; rows_ok [BN] (None: all rows
    < n); k_tail: mask K positions >= k. With `pairs`, w_ref holds uint16 pairs (as_pairs): the
    block is loaded as [BN, BK / 2] and split back into bytes in registers."""
    width = bk // 2 if pairs else bk  # elements of w_ref per block row
    ks = pl.ds(pl.multiple_of(b * width, width), width)
    step = 2 if pairs else 1  # K positions per element
    k_ok = (b * bk + step * lax.broadcasted_iota(jnp.int32, (width,), 0)) < k if k_tail else None
    if not pairs:
        return plgpu.load(w_ref.at[pl.ds(w_row, bn), ks], **_block_mask(rows_ok, k_ok))
    v = plgpu.load(w_ref.at[pl.ds(w_row, bn), ks], **_block_mask(rows_ok, k_ok, other=0))  # [BN, BK/2] u16
    lo, hi = (v & 0xFF).astype(jnp.uint8), (v >> 8).astype(jnp.uint8)
    return lax.bitcast_convert_type(jnp.stack([lo, hi], axis=-1).reshape(bn, bk), jnp.float8_e4m3fn)


def _accumulate(layer_ref, x_ref, w_refs, i, j, s, *, k: int, n: int, m: int, bm: int, bn: int, bk: int,
                split_k: int, pairs: tuple[bool, ...]) -> tuple[jax.Array, ...]:
    # One program's f32 sums [BM, BN] (m tile i, n tile j, k split s), one per weight in w_refs
    # (each [layers * n, k] e4m3, or with its `pairs` [layers * n, k / 2] uint16 (as_pairs): the
    # stack, rows of layer l at l * n); x_ref: [m, k] e4m3, each x block loaded once for all.
    w_row = layer_ref[0] * n + j * bn  # this program's first weight row in the stack
    rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm,), 0)  # [BM]
    cols = j * bn + lax.broadcasted_iota(jnp.int32, (bn,), 0)  # [BN]
    n_ragged, m_ragged = n % bn != 0, m % bm != 0
    col_ok, row_ok = cols < n, rows < m

    k_blocks = pl.cdiv(k, bk)
    per_split = pl.cdiv(k_blocks, split_k)
    b_lo = jnp.minimum(s * per_split, k_blocks)
    b_hi = jnp.minimum(b_lo + per_split, k_blocks)
    b_mid = jnp.clip(k // bk, b_lo, b_hi)  # blocks before b_mid lie wholly inside k

    def make_body(k_tail: bool):
        def body(b, accs):
            ks = pl.ds(pl.multiple_of(b * bk, bk), bk)
            k_ok = (b * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)) < k if k_tail else None  # [BK]
            x = plgpu.load(x_ref.at[pl.ds(i * bm, bm), ks], **_block_mask(row_ok if m_ragged else None, k_ok))
            return tuple(acc + plgpu.dot(x, _load_w(w_ref, w_row, b, col_ok if n_ragged else None, k_tail=k_tail,
                                                    k=k, bn=bn, bk=bk, pairs=paired), trans_b=True)
                         for acc, w_ref, paired in zip(accs, w_refs, pairs))  # fp8 x fp8 -> f32 [BM, BN]
        return body

    accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
    accs = lax.fori_loop(b_lo, b_mid, make_body(False), accs)
    if k % bk:
        accs = lax.fori_loop(b_mid, b_hi, make_body(True), accs)
    return accs


def _tile_masks(i, j, *, n: int, m: int, bm: int, bn: int):
    """(row_ok [BM], col_ok [BN], the store mask [BM, BN]) of tile (i, j)."""
    row_ok = i * bm + lax.broadcasted_iota(jnp.int32, (bm,), 0) < m
    col_ok = j * bn + lax.broadcasted_iota(jnp.int32, (bn,), 0) < n
    return row_ok, col_ok, row_ok[:, None] & col_ok[None, :] if n % bn else row_ok[:, None]


def _scaled(acc, xs_ref, ws_ref, layer_ref, i, j, *, n: int, m: int, bm: int, bn: int) -> jax.Array:
    """acc [BM, BN] f32 times its rows' x scales (xs_ref [m]) and its columns' weight scales
    (ws_ref [layers * n], the stack): the reference's order, (acc * x_scale) * w_scale."""
    row_ok, col_ok, _ = _tile_masks(i, j, n=n, m=m, bm=bm, bn=bn)
    xs = plgpu.load(xs_ref.at[pl.ds(i * bm, bm)], **_vector_mask(row_ok if m % bm else None))  # [BM]
    ws = plgpu.load(ws_ref.at[pl.ds(layer_ref[0] * n + j * bn, bn)], **_vector_mask(col_ok if n % bn else None))
    return acc * xs[:, None] * ws[None, :]


def _tile(layer_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, i, j, s, *, split_k: int, pairs: bool, **kw):
    # One weight's tile; o_ref: [m, n] out_dtype, or [split_k, m, n] f32 partials.
    (acc,) = _accumulate(layer_ref, x_ref, (w_ref,), i, j, s, split_k=split_k, pairs=(pairs,), **kw)
    sizes = {name: kw[name] for name in ("n", "m", "bm", "bn")}
    _, _, st_mask = _tile_masks(i, j, **sizes)
    tile = (pl.ds(i * kw["bm"], kw["bm"]), pl.ds(j * kw["bn"], kw["bn"]))
    if split_k > 1:
        plgpu.store(o_ref.at[(s, *tile)], acc, mask=st_mask)
        return
    y = _scaled(acc, xs_ref, ws_ref, layer_ref, i, j, **sizes)
    plgpu.store(o_ref.at[tile], y.astype(o_ref.dtype), mask=st_mask)


def _swiglu_kernel(layer_ref, x_ref, xs_ref, w1_ref, w3_ref, ws1_ref, ws3_ref, h_ref, amax_ref, *,
                   pairs: tuple[bool, bool], **kw):
    # Tile (i, j) of both w1 and w3 (one x block read for both), then SwiGLU in the epilogue:
    # g, u rounded to h_ref's dtype as the products' outputs would be, h = silu_mul(g, u) ->
    # h_ref [m, n]; each row's max |h| over the tile -> amax_ref [m, n tiles] (the quantization
    # of h needs the max over the whole row: quantize_rows_triton's `block_amax`).
    i, j = pl.program_id(0), pl.program_id(1)
    acc1, acc3 = _accumulate(layer_ref, x_ref, (w1_ref, w3_ref), i, j, 0, split_k=1, pairs=pairs, **kw)
    sizes = {name: kw[name] for name in ("n", "m", "bm", "bn")}
    row_ok, col_ok, st_mask = _tile_masks(i, j, **sizes)
    g = _scaled(acc1, xs_ref, ws1_ref, layer_ref, i, j, **sizes).astype(h_ref.dtype)
    u = _scaled(acc3, xs_ref, ws3_ref, layer_ref, i, j, **sizes).astype(h_ref.dtype)
    h = silu_mul(g, u)  # [BM, BN]
    bm, bn = kw["bm"], kw["bn"]
    plgpu.store(h_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], h, mask=st_mask)
    amax = jnp.max(jnp.where(col_ok[None, :], jnp.abs(h.astype(jnp.float32)), 0.0), axis=1)  # [BM]
    plgpu.store(amax_ref.at[pl.ds(i * bm, bm), j], amax, mask=row_ok)


def _kernel(layer_ref, x_ref, xs_ref, *refs, ns: tuple[int, ...], pairs: tuple[bool, ...], **tile_kw):
    # refs: the weights' w_refs, then their ws_refs, then their o_refs (one group per weight).
    # The grid's n tiles run through the weights in turn: tiles [start, start + cdiv(n, BN))
    # belong to weight g, so several projections of the same x share one launch.
    g = len(ns)
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = 0
    for w_ref, ws_ref, o_ref, n, paired in zip(refs[:g], refs[g:2 * g], refs[2 * g:], ns, pairs):
        tile = functools.partial(_tile, layer_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, i, j - start, s,
                                 n=n, pairs=paired, **tile_kw)
        if g == 1:
            tile()
        else:
            pl.when((j >= start) & (j < start + pl.cdiv(n, tile_kw["bn"])))(tile)
        start += pl.cdiv(n, tile_kw["bn"])


def _operands(x, x_scale, ws, w_scales, layer, pairs, interpret):
    """The launches' operands: (layer [1] i32, x_q [m, k] e4m3, x_scale [m] f32, each weight as
    the kernel reads it, each weight's scales [layers * n]), and x_scale [m, 1].
    Each weight whole ([layers * n, k], or as uint16 byte pairs where `pairs` says) and its scales
    from their whole stack too: a layer's slice handed to a custom call would be copied first,
    one more small kernel per product."""
    k = x.shape[1]
    x_q, x_scale = quantize_unless(x, x_scale, functools.partial(quantize_input, impl="triton", interpret=interpret))
    weights = [as_pairs(w.reshape(-1, k)) if p else w.reshape(-1, k) for w, p in zip(ws, pairs)]
    scales = [s.astype(jnp.float32).reshape(-1) for s in w_scales]
    return (jnp.reshape(layer, (1,)).astype(jnp.int32), x_q, x_scale[:, 0], *weights, *scales), x_scale


def _paired(ws, k: int, pairs: bool | None) -> tuple[bool, ...]:
    """Which stacks [layers, n, k] go in as byte pairs (None: the 2-4 GiB ones, see the module
    docstring; True or False: all of them so)."""
    paired = tuple(triton_offsets_overflow(w.shape, w.dtype) if pairs is None else bool(pairs) for w in ws)
    if any(paired) and k % 2:
        raise ValueError(f"fp8_matmul_triton: a weight stack of 2-4 GiB ({[tuple(w.shape) for w in ws]}) "
                         f"is read as byte pairs, which needs an even k (got k={k}); use impl='mgpu' or 'xla'")
    return paired


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_m", "block_n",
                                             "block_k", "split_k", "num_warps", "num_stages", "pairs"))
def _fp8_matmul(x, x_scale, ws, w_scales, layer, *, out_dtype, interpret, block_m, block_n, block_k, split_k,
                num_warps, num_stages, pairs):
    # ws: tuple of [layers, n_g, k], w_scales: tuple of [layers, n_g], layer: [] i32 -> tuple of y_g
    # pairs: tuple of bool, which weights go in as uint16 pairs (as_pairs)
    m, k = x.shape
    ns = tuple(w.shape[1] for w in ws)
    bm, bn, bk = block_m, block_n, block_k
    operands, x_scale = _operands(x, x_scale, ws, w_scales, layer, pairs, interpret)
    kernel = functools.partial(_kernel, ns=ns, pairs=pairs, k=k, m=m, bm=bm, bn=bn, bk=bk, split_k=split_k)
    out_shape = tuple(jax.ShapeDtypeStruct((split_k, m, n), jnp.float32) if split_k > 1
                      else jax.ShapeDtypeStruct((m, n), out_dtype) for n in ns)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, bm), sum(pl.cdiv(n, bn) for n in ns), split_k),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(*operands)
    if split_k > 1:  # the partials' sum and both scales: one XLA fusion per weight
        layer_scales = [jax.lax.dynamic_index_in_dim(s, layer, keepdims=False).astype(jnp.float32) for s in w_scales]
        outs = tuple(scale_output(jnp.sum(o, axis=0), x_scale, s, out_dtype) for o, s in zip(outs, layer_scales))
    return tuple(outs)


def fp8_matmul_triton(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, layer=None, x_scale=None,
                      out_dtype=jnp.bfloat16, interpret: bool = False, **tuning) -> jax.Array:
    """y [m, n] = quant(x [m, k]) @ (w [n, k] e4m3 * w_scale [n]).T through Pallas/Triton; or,
    with `layer`, w [layers, n, k] and w_scale [layers, n], layer `layer` read in place.
    x_scale [m, 1]: x is already e4m3 (see fp8_matmul).
    `interpret=True` runs in Pallas interpret mode (CPU). `tuning` (benchmarks, sweeps, tests): any
    `plan` override: block_m, block_n, block_k, split_k, num_warps, num_stages; and `pairs`
    (None: by `triton_offsets_overflow`; True or False: every weight so, e.g. to run the pairs
    path at small shapes in tests)."""
    return fp8_matmul_group_triton(x, (w,), (w_scale,), layer=layer, x_scale=x_scale, out_dtype=out_dtype,
                                   interpret=interpret, **tuning)[0]


def fp8_matmul_group_triton(x: jax.Array, ws, w_scales, *, layer=None, x_scale=None, out_dtype=jnp.bfloat16,
                            interpret: bool = False, pairs: bool | None = None, **tuning) -> tuple[jax.Array, ...]:
    """fp8_matmul_triton for several weights of the same x (q, k, v; w1, w3) in one launch:
    x quantized once, the grid's n tiles spread over all of them. Returns one y per weight."""
    checked = [check_stacked(x, w, s, layer) for w, s in zip(ws, w_scales)]
    m, k = x.shape
    paired = _paired([w for w, _, _ in checked], k, pairs)
    cfg = plan(m, sum(w.shape[1] for w, _, _ in checked), k, sms=DEFAULT_SMS if interpret else None, **tuning)
    return _fp8_matmul(x, x_scale, tuple(w for w, _, _ in checked), tuple(s for _, s, _ in checked),
                       checked[0][2], out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret), pairs=paired, **cfg)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_m", "block_n", "block_k", "num_warps",
                                             "num_stages", "pairs"))
def _fp8_swiglu(x, x_scale, w1, w3, s1, s3, layer, *, out_dtype, interpret, block_m, block_n, block_k, num_warps,
                num_stages, pairs):
    # w1, w3: [layers, n, k] e4m3; s1, s3: [layers, n]; layer: [] i32 -> (h_q [m, n], h_scale [m, 1])
    m, k = x.shape
    n = w1.shape[1]
    operands, _ = _operands(x, x_scale, (w1, w3), (s1, s3), layer, pairs, interpret)
    n_tiles = pl.cdiv(n, block_n)
    kernel = functools.partial(_swiglu_kernel, pairs=pairs, k=k, m=m, n=n, bm=block_m, bn=block_n, bk=block_k)
    h, amax = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), n_tiles),
        out_shape=(jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((m, n_tiles), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_swiglu",
    )(*operands)
    return quantize_rows_triton(h, block_amax=amax, interpret=interpret)


def fp8_swiglu_triton(x: jax.Array, w1: jax.Array, w3: jax.Array, s1: jax.Array, s3: jax.Array, *, layer=None,
                      x_scale=None, out_dtype=jnp.bfloat16, interpret: bool = False, pairs: bool | None = None,
                      **tuning) -> tuple[jax.Array, jax.Array] | None:
    """SwiGLU's hidden activation quantized for w2, at decode: (h_q [m, n] e4m3, h_scale [m, 1]
    f32) = quantize_rows(silu_mul(g, u)), g and u the products of x with w1 and w3 (out_dtype),
    in two launches: one program per (m tile, n tile) takes that tile of both products (each x
    block read once), runs silu_mul on them and keeps each row's max |h| of the tile; then the
    quantizer spreads over the row (quantize_rows_triton's block_amax), where a quantizer of one
    program per row would run a whole row of 32,768 on one SM.
    Returns None where the plan splits K (few n tiles: the partials need a sum first): the
    caller runs the products and the fused quantizer instead. Arguments as fp8_matmul_triton's."""
    (w1, s1, layer_i), (w3, s3, _) = check_stacked(x, w1, s1, layer), check_stacked(x, w3, s3, layer)
    if w1.shape != w3.shape:
        raise ValueError(f"fp8_swiglu: w1 {w1.shape} and w3 {w3.shape} must have one shape")
    m, k = x.shape
    # Tiled as the grouped launch of both (same bytes per program and in all).
    cfg = plan(m, 2 * w1.shape[1], k, sms=DEFAULT_SMS if interpret else None, **tuning)
    if cfg.pop("split_k") > 1:
        return None
    return _fp8_swiglu(x, x_scale, w1, w3, s1, s3, layer_i, out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret),
                       pairs=_paired((w1, w3), k, pairs), **cfg)
