"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Same contract as `ragged_paged_attention_reference` (see `reference.py`):
packed ragged queries q [T, Hq, D], paged K/V pools [P, page_size, Hkv, D] or stacked
[L, P, page_size, Hkv, D] with a traced `layer`, kv_lens [S], page_indices [S, pages_per_seq],
cu_q_lens [S+1], traced num_seqs. Output [T, Hq, D] in q's dtype, padding rows exact zeros.

Design
------
* The pools go into the kernel whole (no XLA slice of the layer, no padding of head_dim): a
  4-D pool is reshaped (free) to a 5-D one with one layer, and every K/V tile is a gather
  `pool[layer, page[:, None], slot[:, None], kv_head, d[None, :]]` of BLOCK_K cache positions,
  which may span several pages (page_size 1..128; BLOCK_K = 64 positions by default, so with
  page_size 16 one iteration reads 4 pages). head_dim is padded to a power of two inside the
  kernel by masked loads (D=24 -> 32 lanes); masked stores write back only the real lanes.
  Pallas switches to 64-bit offsets when a pool is over 4 GiB.
* One program handles one (query tile, kv head[, kv split]): its rows are BLOCK_Q tokens x all
  G = Hq/Hkv query heads of that kv head (G padded to a power of two), so each K/V byte of a
  tile is read once for the whole group, and both products are tensor-core `dot`s with
  M = BLOCK_Q * G >= 16 rows.
* Two launches per call, each over a static grid (one compilation per (T, S, pages_per_seq)):
    - "decode": sequences with 1 <= q_len <= BLOCK_Q_DEC (= 16 / G tokens: a 16-row tile),
      grid (S, Hkv, num_splits). The visible KV range is cut into num_splits contiguous pieces
      (flash-decoding); each writes an f32 partial output and its log-sum-exp, and a small third
      launch (`_combine`, one program per packed row and kv head) merges them into the rows.
      num_splits is chosen from S and Hkv so that batch 1 still fills the SMs.
    - "prefill": sequences with q_len > BLOCK_Q_DEC, tiled into BLOCK_Q_PRE-token query tiles
      (M = 64..128 rows), one program per (tile, kv head), online softmax over KV blocks up to
      the tile's causal limit. The tile -> (sequence, first row) table is built in XLA from
      cu_q_lens (a static upper bound on the tile count), unused tiles exit at once.
  Rows are then merged with `where` (rows of no live sequence -> exact 0). These tables depend
  on the batch's layout only: `schedule()` builds them once per step for every layer.
* Positions >= kv_len are masked in the loads (other=0), so stale pages / NaN garbage never
  enter; unused block-table entries are clamped to page 0 before the address computation.
* Scores and softmax in f32 (f32 inputs use full-precision dots), probabilities cast to v's
  dtype before P @ V, f32 accumulation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_info import DEFAULT_SMS, next_pow2, num_sms
from pallas_kernels.ragged_paged_attention.common import MASK_VALUE

__all__ = ["ragged_paged_attention_triton", "plan", "schedule"]

_LOG2E = math.log2(math.e)


def plan(T: int, S: int, Hq: int, Hkv: int, D: int, *, num_splits: int | None = None,
         block_k_dec: int | None = None, block_k_pre: int | None = None,
         rows_pre: int | None = None, interpret: bool = False) -> dict:
    """Static tiling for one shape bucket (pure Python; exposed for tests and benchmarks)."""
    G = Hq // Hkv
    GP = next_pow2(G)
    BD = max(16, next_pow2(D))
    bq_dec = max(1, 16 // GP)
    rows_pre = rows_pre or (64 if BD > 128 else 128)
    bq_pre = max(bq_dec * 2, rows_pre // GP)
    if num_splits is None:
        # Enough programs for ~4 waves when the batch is small; 1 split once the batch fills.
        sms = DEFAULT_SMS if interpret else num_sms()
        num_splits = max(1, min(64, next_pow2(-(-4 * sms // max(1, S * Hkv)))))
    bk_dec = block_k_dec or (64 if BD <= 128 else 32)
    bk_pre = block_k_pre or (64 if BD <= 128 else 32)
    # Static bound on prefill tiles: sum over long seqs of cdiv(q_len, bq_pre).
    n_long = min(S, T // (bq_dec + 1))
    n_pre_tiles = (T // bq_pre + n_long) if n_long else 0
    return dict(G=G, GP=GP, BD=BD, bq_dec=bq_dec, bq_pre=bq_pre, num_splits=num_splits,
                bk_dec=bk_dec, bk_pre=bk_pre, n_pre_tiles=n_pre_tiles)


def _attn_kernel(
    # inputs
    layer_ref, tile_seq_ref, tile_q0_ref, kv_lens_ref, cu_ref, pages_ref, q_ref, k_ref, v_ref,
    # outputs
    o_ref, *lse_refs,
    G: int, GP: int, D: int, BD: int, BQ: int, BK: int, page_size: int, num_pages: int,
    num_splits: int, scale: float, exact_f32: bool, q0_zero: bool,
):
    tile = pl.program_id(0)
    kvh = pl.program_id(1)
    split = pl.program_id(2)
    seq = tile_seq_ref[tile]
    M = BQ * GP
    T = q_ref.shape[0]
    pages_per_seq = pages_ref.shape[1]

    @pl.when(seq >= 0)
    def _():
        layer = layer_ref[0]
        kv_len = kv_lens_ref[seq]
        q_start = cu_ref[seq]
        q_len = cu_ref[seq + 1] - q_start
        q0 = 0 if q0_zero else tile_q0_ref[tile]  # first query of this tile, within the sequence

        r = lax.broadcasted_iota(jnp.int32, (M, 1), 0)
        tok_in_tile = r // GP
        g = r % GP
        tok = q0 + tok_in_tile  # [M, 1] query index within the sequence
        row_ok = (tok < q_len) & (g < G)
        t_row = jnp.where(row_ok, q_start + tok, 0)
        t_row = jnp.minimum(t_row, T - 1)
        g_idx = jnp.minimum(g, G - 1)
        d = lax.broadcasted_iota(jnp.int32, (1, BD), 1)
        d_ok = d < D
        d_idx = jnp.minimum(d, D - 1) if BD != D else d
        q_mask = (row_ok & d_ok) if BD != D else row_ok
        q = plgpu.load(q_ref.at[t_row, kvh, g_idx, d_idx], mask=q_mask, other=0)  # [M, BD]
        q_pos = kv_len - q_len + tok  # [M, 1] absolute position of each row

        # KV range visible to this tile (causal), split into num_splits pieces of whole blocks.
        last_tok = jnp.minimum(q0 + BQ, q_len)
        kv_hi = jnp.clip(kv_len - q_len + last_tok, 0, kv_len)
        n_blocks = pl.cdiv(kv_hi, BK)
        per_split = pl.cdiv(n_blocks, num_splits)
        b_lo = jnp.minimum(split * per_split, n_blocks)
        b_hi = jnp.minimum(b_lo + per_split, n_blocks)  # past _splits_used: empty, nothing stored
        # Blocks wholly visible to every row of the tile (the first row sees the fewest):
        # no causal / length mask needed there.
        full = jnp.clip(kv_len - q_len + q0 + 1, 0, kv_len) // BK
        b_mid = jnp.clip(full, b_lo, b_hi)

        kpos_base = lax.broadcasted_iota(jnp.int32, (BK, 1), 0)
        kcol_base = lax.broadcasted_iota(jnp.int32, (1, BK), 1)
        dot_prec = lax.Precision.HIGHEST if exact_f32 else None
        qk_scale = scale * _LOG2E  # softmax in base 2: exp2(x * log2 e) = exp(x)

        def make_body(masked):
            def body(b, carry):
                acc, m_i, l_i = carry
                start = b * BK
                pos = start + kpos_base  # [BK, 1]
                pidx = jnp.minimum(pos // page_size, pages_per_seq - 1)
                page = plgpu.load(pages_ref.at[seq, pidx])  # [BK, 1]
                slot = pos % page_size
                if masked:
                    in_cache = pos < kv_len
                    page = jnp.where(in_cache, page, 0)
                    kv_mask = (in_cache & d_ok) if BD != D else in_cache
                else:
                    kv_mask = d_ok if BD != D else None
                page = jnp.clip(page, 0, num_pages - 1)
                kw = {} if kv_mask is None else dict(mask=kv_mask, other=0)
                k = plgpu.load(k_ref.at[layer, page, slot, kvh, d_idx], **kw)
                v = plgpu.load(v_ref.at[layer, page, slot, kvh, d_idx], **kw)
                s = plgpu.dot(q, k, trans_b=True, precision=dot_prec) * qk_scale  # [M, BK]
                if masked:
                    col = start + kcol_base  # [1, BK]
                    visible = (col <= q_pos) & (col < kv_len)
                    s = jnp.where(visible, s, MASK_VALUE)
                m_new = jnp.maximum(m_i, jnp.max(s, axis=1, keepdims=True))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - m_new)
                l_new = l_i * alpha + jnp.sum(p, axis=1, keepdims=True)
                acc = acc * alpha + plgpu.dot(p.astype(v.dtype), v, precision=dot_prec)
                return acc, m_new, l_new
            return body

        acc0 = jnp.zeros((M, BD), jnp.float32)
        m0 = jnp.full((M, 1), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((M, 1), jnp.float32)
        carry = lax.fori_loop(b_lo, b_mid, make_body(False), (acc0, m0, l0))
        acc, m_i, l_i = lax.fori_loop(b_mid, b_hi, make_body(True), carry)

        has = l_i > 0
        out = jnp.where(has, acc / jnp.where(has, l_i, 1.0), 0.0)
        # Masked-off lanes go to a trash slot (an extra row / tile slot in the outputs): on the
        # GPU they do not store at all, but in interpret mode a masked store is a
        # read-modify-write scatter, and a clamped duplicate index would clobber a real row.
        st_mask = (row_ok & d_ok) if BD != D else row_ok
        if lse_refs:
            # Decode partials are indexed [split, tile, token in tile (+ trash), kvh, g, d]. An
            # empty split stores nothing: the combine reads only the splits that have blocks.
            used = b_lo < b_hi
            st_tok = jnp.where(st_mask, tok_in_tile, BQ)
            plgpu.store(o_ref.at[split, tile, st_tok, kvh, g_idx, d_idx],
                        out.astype(o_ref.dtype), mask=st_mask & used)
            lse = jnp.where(has, m_i + jnp.log2(jnp.where(has, l_i, 1.0)), MASK_VALUE)  # base 2
            (lse_ref,) = lse_refs
            plgpu.store(lse_ref.at[split, tile, jnp.where(row_ok, tok_in_tile, BQ), kvh, g_idx],
                        lse, mask=row_ok & used)
        else:
            st_row = jnp.where(st_mask, t_row, T)
            plgpu.store(o_ref.at[st_row, kvh, g_idx, d_idx], out.astype(o_ref.dtype),
                        mask=st_mask)


def _launch(q4, k5, v5, layer, tile_seq, tile_q0, kv_lens, cu, pages, *, BQ, BK, num_splits,
            partial, scale, num_warps, num_stages, interpret, name):
    T, Hkv, G, D = q4.shape
    page_size = k5.shape[2]
    num_pages = k5.shape[1]
    GP = next_pow2(G)
    BD = max(16, next_pow2(D))
    n_tiles = tile_seq.shape[0]
    kernel = functools.partial(
        _attn_kernel, G=G, GP=GP, D=D, BD=BD, BQ=BQ, BK=BK, page_size=page_size,
        num_pages=num_pages, num_splits=num_splits, scale=scale,
        exact_f32=(q4.dtype == jnp.float32 or k5.dtype == jnp.float32), q0_zero=tile_q0 is None)
    if partial:
        out_shape = (jax.ShapeDtypeStruct((num_splits, n_tiles, BQ + 1, Hkv, G, D), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, n_tiles, BQ + 1, Hkv, G), jnp.float32))
    else:
        out_shape = jax.ShapeDtypeStruct((T + 1, Hkv, G, D), q4.dtype)
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, Hkv, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(layer, tile_seq, tile_seq if tile_q0 is None else tile_q0, kv_lens, cu, pages, q4, k5, v5)


def _splits_used(n_blocks, num_splits: int):
    """How many of a decode tile's num_splits pieces hold KV blocks (the kernel gives each
    cdiv(n_blocks, num_splits) blocks; the rest are empty): at batch 1 the launch may have 64
    splits, of which a 100-token context fills 2."""
    return pl.cdiv(n_blocks, jnp.maximum(pl.cdiv(n_blocks, num_splits), 1))


def _combine_kernel(seq_ref, tok_ref, dec_ref, kv_lens_ref, o_ref, lse_ref, out_ref, *, NS: int, G: int, D: int,
                    BK: int):
    # One packed row t and kv head h: the decode launch's partials of the row's G query heads
    # (o_ref [NS, tiles, BQ + 1, Hkv, G, D] f32, lse_ref [NS, tiles, BQ + 1, Hkv, G] base-2
    # log-sum-exps) merged by their softmax weights; out_ref [T, Hkv, GP, BD] (padded). Only the
    # splits that hold blocks are read (the others stored nothing), each as one contiguous
    # [G, D] load; the sums run in split order, so empty splits (weight exactly 0) change no bit.
    t, h = pl.program_id(0), pl.program_id(1)
    GP, BD = out_ref.shape[2:]
    s, tok, dec = seq_ref[t], tok_ref[t], dec_ref[t]
    n_used = _splits_used(pl.cdiv(kv_lens_ref[s], BK), NS)  # a decode tile sees all of its kv_len
    g = lax.broadcasted_iota(jnp.int32, (GP, 1), 0)
    d = lax.broadcasted_iota(jnp.int32, (1, BD), 1)
    # Index arrays clamped only where G or D is padded: plain iotas keep the loads contiguous.
    g_idx, d_idx = (jnp.minimum(g, G - 1) if GP != G else g), (jnp.minimum(d, D - 1) if BD != D else d)
    lse_of = lambda i: plgpu.load(lse_ref.at[i, s, tok, h, g_idx])  # [GP, 1]  # noqa: E731
    m = lax.fori_loop(1, n_used, lambda i, m: jnp.maximum(m, lse_of(i)), lse_of(0))

    def add(i, carry):
        acc, weight_sum = carry
        w = jnp.exp2(lse_of(i) - m)
        return acc + plgpu.load(o_ref.at[i, s, tok, h, g_idx, d_idx]) * w, weight_sum + w

    acc, weight_sum = lax.fori_loop(0, n_used, add, (jnp.zeros((GP, BD), jnp.float32), jnp.zeros((GP, 1), jnp.float32)))
    out = acc / weight_sum  # [GP, BD]; rows not decoded here (n_used 0) are replaced below
    plgpu.store(out_ref.at[t, h], jnp.where(dec > 0, out, 0.0).astype(out_ref.dtype))


def _combine(o_part, lse, seq_c, tok, row_dec, kv_lens, dtype, *, BK: int, interpret: bool):
    """The decode launch's partials -> its packed rows' output [T, Hkv, G, D] in `dtype` (rows
    not decoded by it: 0), in one launch (as XLA ops: max, exp, sum and a gather, three small
    kernels in every layer)."""
    NS, _, _, Hkv, G, D = o_part.shape
    T = seq_c.shape[0]
    GP, BD = next_pow2(G), max(16, next_pow2(D))
    out = pl.pallas_call(
        functools.partial(_combine_kernel, NS=NS, G=G, D=D, BK=BK),
        grid=(T, Hkv),
        out_shape=jax.ShapeDtypeStruct((T, Hkv, GP, BD), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rpa_combine",
    )(seq_c, tok, row_dec, kv_lens, o_part, lse)
    return out if (GP, BD) == (G, D) else out[:, :, :G, :D]


def schedule(kv_lens, page_indices, cu_q_lens, num_seqs, *, num_tokens: int, n_heads: int, n_kv_heads: int,
             head_dim: int, interpret: bool = False, **tuning) -> dict:
    """The two launches' tables, from the batch's layout alone (no layer, no q, no pages): which
    sequence each decode and prefill tile serves, and which launch each packed row takes its
    output from. The same for every layer of a step, so the model computes it once per step
    (`PagedKVCache.prepare`); inside the layer loop it would be 3 more small kernels per layer.
    `tuning`: plan()'s overrides, as the kernel's."""
    T, S = num_tokens, page_indices.shape[0]
    cfg = plan(T, S, n_heads, n_kv_heads, head_dim, interpret=interpret, **tuning)
    cu = jnp.asarray(cu_q_lens, jnp.int32).reshape(S + 1)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    live = jnp.arange(S, dtype=jnp.int32) < num_seqs
    q_lens = jnp.where(live, cu[1:] - cu[:-1], 0)
    bq_dec = cfg["bq_dec"]
    # Decode launch: one tile per short sequence.
    is_dec = (q_lens >= 1) & (q_lens <= bq_dec)
    out = dict(dec_seq=jnp.where(is_dec, jnp.arange(S, dtype=jnp.int32), -1))
    # Each packed row's sequence, and its token within the decode tile's output.
    seq_of_row = _row_seq(cu, num_seqs, T)
    row_live = seq_of_row >= 0
    seq_c = jnp.maximum(seq_of_row, 0)
    row_qlen = jnp.where(row_live, q_lens[seq_c], 0)
    out.update(seq_c=seq_c, tok=jnp.clip(jnp.arange(T, dtype=jnp.int32) - cu[seq_c], 0, bq_dec - 1),
               row_dec=(row_live & (row_qlen <= bq_dec)).astype(jnp.int32), row_pre=row_live & (row_qlen > bq_dec))
    n_pre = cfg["n_pre_tiles"]
    if n_pre:
        bq_pre = cfg["bq_pre"]
        n_t = jnp.where(q_lens > bq_dec, pl.cdiv(q_lens, bq_pre), 0)
        cum = jnp.cumsum(n_t)
        t_ids = jnp.arange(n_pre, dtype=jnp.int32)
        t_seq_c = jnp.minimum(_count_le(cum, t_ids), S - 1)  # searchsorted(side="right") without a while loop
        # Within a sequence, tiles go last-first: the long (late, causal) tiles start first,
        # the short ones fill the tail of the launch.
        out.update(pre_seq=jnp.where(t_ids < cum[-1], t_seq_c, -1), pre_q0=(cum[t_seq_c] - 1 - t_ids) * bq_pre)
    return out


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "num_splits", "block_k_dec", "block_k_pre",
                     "rows_pre", "warps_dec", "warps_pre", "stages"))
def _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, layer, sched, *, sm_scale,
         interpret, num_splits=None, block_k_dec=None, block_k_pre=None, rows_pre=None,
         warps_dec=4, warps_pre=4, stages=3):
    T, Hq, D = q.shape
    if k_pages.ndim == 4:
        k_pages, v_pages = k_pages[None], v_pages[None]  # free reshape
    _, P, page_size, Hkv, Dk = k_pages.shape
    S = page_indices.shape[0]
    G = Hq // Hkv
    tuning = dict(num_splits=num_splits, block_k_dec=block_k_dec, block_k_pre=block_k_pre, rows_pre=rows_pre)
    cfg = plan(T, S, Hq, Hkv, D, interpret=interpret, **tuning)
    if sched is None:
        sched = schedule(kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens=T, n_heads=Hq, n_kv_heads=Hkv,
                         head_dim=D, interpret=interpret, **tuning)
    scale = float(D**-0.5 if sm_scale is None else sm_scale)

    kv_lens = jnp.asarray(kv_lens, jnp.int32).reshape(S)
    cu = jnp.asarray(cu_q_lens, jnp.int32).reshape(S + 1)
    pages = jnp.asarray(page_indices, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    q4 = q.reshape(T, Hkv, G, D)

    bq_dec = cfg["bq_dec"]
    common = dict(scale=scale, interpret=interpret, num_stages=stages)
    ns = cfg["num_splits"]
    # Decode tiles start at their sequence's first query: the kernel takes q0 = 0 statically (a
    # zeros table here would be one more small kernel in every layer).
    o_part, lse = _launch(q4, k_pages, v_pages, layer, sched["dec_seq"], None, kv_lens, cu, pages,
                          BQ=bq_dec, BK=cfg["bk_dec"], num_splits=ns, partial=True,
                          num_warps=warps_dec, name="rpa_decode", **common)
    out = _combine(o_part, lse, sched["seq_c"], sched["tok"], sched["row_dec"], kv_lens, q.dtype, BK=cfg["bk_dec"],
                   interpret=interpret)
    if cfg["n_pre_tiles"]:
        o_pre = _launch(q4, k_pages, v_pages, layer, sched["pre_seq"], sched["pre_q0"], kv_lens, cu, pages,
                        BQ=cfg["bq_pre"], BK=cfg["bk_pre"], num_splits=1, partial=False,
                        num_warps=warps_pre, name="rpa_prefill", **common)
        out = jnp.where(sched["row_pre"][:, None, None, None], o_pre[:T], out)
    return out.reshape(T, Hq, D)


def _count_le(sorted_vals, x):
    """#{j : sorted_vals[j] <= x[i]} for each i: searchsorted(side="right") as one compare and
    sum (jnp.searchsorted's default is a loop of small launches: slow on the GPU)."""
    return jnp.sum(sorted_vals[None, :] <= x[:, None], axis=1, dtype=jnp.int32)


def _row_seq(cu, num_seqs, T):
    rows = jnp.arange(T, dtype=jnp.int32)
    seq = _count_le(cu, rows) - 1
    return jnp.where(rows < cu[num_seqs], seq, -1)


def ragged_paged_attention_triton(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    layer: jax.Array | None = None,
    sm_scale: float | None = None,
    interpret: bool = False,
    schedule: dict | None = None,
    **tuning,
) -> jax.Array:
    """Ragged paged attention on the GPU through Pallas/Triton; the contract of
    `ragged_paged_attention_reference`. `interpret=True` runs the kernel in Pallas interpret
    mode (CPU). `schedule`: `schedule()` of this call's layout, computed once for all layers
    (None: computed here). `tuning` (benchmarks only): num_splits, block_k_dec, block_k_pre,
    rows_pre, warps_dec, warps_pre, stages."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got {q.shape}")
    if k_pages.ndim not in (4, 5) or k_pages.shape != v_pages.shape:
        raise ValueError(f"k/v pages must share a [(L,) P, page, Hkv, D] shape: "
                         f"{k_pages.shape} vs {v_pages.shape}")
    if (k_pages.ndim == 5) != (layer is not None):
        raise ValueError("stacked 5-D pools need `layer`, 4-D pools must not have one")
    T, Hq, D = q.shape
    Hkv, Dk = k_pages.shape[-2:]
    if Dk != D:
        raise ValueError(f"q head_dim {D} != kv head_dim {Dk}")
    if Hq % Hkv:
        raise ValueError(f"n_heads={Hq} is not a multiple of n_kv_heads={Hkv}")
    if next_pow2(Hq // Hkv) > 16:
        raise NotImplementedError(f"GQA group {Hq // Hkv} > 16 is not supported by the Triton kernel")
    if D > 256:
        raise NotImplementedError(f"head_dim {D} > 256 is not supported by the Triton kernel")
    if not 1 <= k_pages.shape[-3] <= 1024:
        raise NotImplementedError(f"page_size {k_pages.shape[-3]} is not supported")
    if T == 0:
        return jnp.zeros_like(q)
    if layer is None:
        layer = jnp.int32(0)
    return _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, layer, schedule,
                sm_scale=None if sm_scale is None else float(sm_scale), interpret=interpret,
                **tuning)
