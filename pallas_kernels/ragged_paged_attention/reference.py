"""Ragged paged attention: the plain-`jnp` reference (the spec a Pallas kernel must match).

A serving step packs the new tokens of many sequences into one flat batch of queries,
sequence after sequence, and keeps every sequence's keys/values in fixed-size pages of a
shared pool, found through a block table:

    q            [num_tokens, n_heads, head_dim]       packed queries; rows of sequence s are
                                                       cu_q_lens[s]:cu_q_lens[s+1]
    k_pages,
    v_pages      [num_pages, page_size, n_kv_heads, head_dim]   one layer's page pool
    kv_lens      [max_seqs] int32                      cached tokens of each sequence, INCLUDING
                                                       this step's new ones (0 for empty slots)
    page_indices [max_seqs, pages_per_seq] int32       block tables
    cu_q_lens    [max_seqs + 1] int32                  cumulative query lengths
    num_seqs     int32 scalar                          how many leading slots are live

Semantics. Query i (0-based within its chunk of length q_len = cu_q_lens[s+1] - cu_q_lens[s])
of sequence s sits at absolute position kv_len - q_len + i and attends causally to cache
positions 0..that position; cache position p of sequence s lives in page
page_indices[s, p // page_size], slot p % page_size. Grouped-query attention: query head h uses
kv head h // (n_heads // n_kv_heads). Scores and softmax are f32 (probabilities are cast back to
the value dtype before the second matmul, as `mistral_jax.cache.kv_cache.dense_attention` does);
the output is in q's dtype. Query rows that belong to no live sequence (rows at or past
cu_q_lens[num_seqs], i.e. padding) come out as exact zeros.

Masking uses the finite MASK_VALUE of common.py (the engine's dense attention shares it), so a
row with nothing visible (only possible for malformed input, kv_len < q_len) gives finite
output rather than NaN.
Values at cache positions >= kv_len (stale or never-written page slots, unused block-table
entries) are zeroed before use, so garbage there, even NaN, cannot leak into the output.

Formulation and cost (reference only; clarity first, but it is the CPU engine's attention).
Cache positions are read in chunks of KV_CHUNK_TOKENS (whole pages), only as far as kv_len (a
traced bound), each gathered into a contiguous view and folded in by an online softmax
(running max and sum, f32). Probabilities are cast to the value dtype before the second
matmul, unnormalized (exp(score - running max) <= 1), and the sum divides at the end. Two
passes:
- decode rows (sequences with one query row) all at once: each row against its own pages,
  [seqs, chunk, n_kv_heads, head_dim] per chunk, up to the longest such kv_len;
- then a `lax.fori_loop` over the other (prefill) sequences: ALL num_tokens query rows are
  scored against the sequence's chunks and only its rows kept -- O(num_tokens * kv_len) per
  such sequence, wasteful for many small chunks in one step but memory-sane and shape-static.
(Decode rows get the first pass because in the second each would cost a sweep over every
row of the step.) Cost follows kv_len, not the block table's width, so one
full-width table serves every step, and the loop bounds are traced values, so
one compilation serves every batch mix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import MASK_VALUE, token_seq_ids

__all__ = ["ragged_paged_attention_reference"]

KV_CHUNK_TOKENS = 64  # cache positions per step of the reference's loop (whole pages): decode reads at most 63 more


def ragged_paged_attention_reference(
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
) -> jax.Array:
    """Causal GQA of packed ragged queries over paged KV; see the module docstring for shapes,
    semantics and cost. With `layer`, k_pages/v_pages are the stacked pools of every layer,
    [n_layers, num_pages, page_size, n_kv_heads, head_dim], and `layer` picks one.
    Returns [num_tokens, n_heads, head_dim] in q's dtype."""
    num_tokens, n_heads, head_dim = q.shape
    page_size, n_kv = k_pages.shape[-3], k_pages.shape[-2]
    # Gather a sequence's pages straight from the (stacked) pool: slicing the layer out first
    # would copy the whole layer's pool every call.
    gather = (lambda pool, pages: pool[pages]) if layer is None else (lambda pool, pages: pool[layer, pages])
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    group = n_heads // n_kv
    chunk_pages = max(1, KV_CHUNK_TOKENS // page_size)
    chunk = chunk_pages * page_size
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    kv_lens = jnp.asarray(kv_lens, jnp.int32)
    cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
    page_indices = jnp.asarray(page_indices, jnp.int32)
    width = page_indices.shape[1]
    # Whole chunks of block-table entries (padding entries point at page 0: masked as >= kv_len).
    page_indices = jnp.pad(page_indices, ((0, 0), (0, -width % chunk_pages)))
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())

    seq_of_row = token_seq_ids(cu_q_lens, num_seqs, num_tokens)  # [T]
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    qg = q.reshape(num_tokens, n_kv, group, head_dim)  # query heads grouped by kv head

    def attend(s, qr, q_pos):
        """Rows qr [R, kv, g, D] of sequence s at absolute positions q_pos [R] -> [R, H, D] f32."""
        kv_len = kv_lens[s]

        def chunk_kv(c):  # the sequence's pages of chunk c, shared by every row
            pages = jax.lax.dynamic_slice_in_dim(page_indices[s], c * chunk_pages, chunk_pages)
            kv_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            in_cache = kv_pos < kv_len  # [chunk]
            k = gather(k_pages, pages).reshape(chunk, n_kv, head_dim)
            v = jnp.where(in_cache[:, None, None], gather(v_pages, pages).reshape(chunk, n_kv, head_dim), 0)
            return k, v, (kv_pos[None, :] <= q_pos[:, None]) & in_cache[None, :]  # visible [R, chunk]

        o = _online_softmax(qr, (kv_len + chunk - 1) // chunk, chunk_kv, ("tkgd,skd->tkgs", "tkgs,skd->tkgd"), scale)
        return o.reshape(qr.shape[0], n_heads, head_dim)

    def decode_rows(out):
        """Every one-row (decode) sequence at once: its row attends with its own pages alone,
        all sequences side by side, chunk by chunk up to the longest of them."""
        n = kv_lens.shape[0]
        q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
        is_decode = (q_lens == 1) & (jnp.arange(n) < num_seqs)  # [S]
        row = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)
        lens = jnp.where(is_decode, kv_lens, 0)

        def chunk_kv(c):  # each sequence's own pages of chunk c
            pages = jax.lax.dynamic_slice_in_dim(page_indices, c * chunk_pages, chunk_pages, axis=1)  # [S, cp]
            visible = (c * chunk + jnp.arange(chunk, dtype=jnp.int32))[None, :] < lens[:, None]  # [S, chunk]
            k = gather(k_pages, pages).reshape(n, chunk, n_kv, head_dim)
            v = jnp.where(visible[:, :, None, None], gather(v_pages, pages).reshape(n, chunk, n_kv, head_dim), 0)
            return k, v, visible

        o = _online_softmax(qg[row], (jnp.max(lens) + chunk - 1) // chunk, chunk_kv,
                            ("nkgd,nskd->nkgs", "nkgs,nskd->nkgd"), scale)
        return out.at[jnp.where(is_decode, row, num_tokens)].set(o.reshape(n, n_heads, head_dim), mode="drop")

    def prefill_rows(i, out):  # the i-th prefill chunk: every packed row, keeping its sequence's
        s = prefill_seqs[i]
        q_start = cu_q_lens[s]
        q_len = cu_q_lens[s + 1] - q_start
        q_pos = kv_lens[s] - q_len + (rows - q_start)  # [T] absolute position of each row (if mine)
        return jnp.where((seq_of_row == s)[:, None, None], attend(s, qg, q_pos), out)

    # Only the sequences with several rows go through the loop (a pure decode step: no trip at
    # all; on XLA:CPU each trip costs tens of microseconds, even one that does nothing).
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    is_prefill = (q_lens > 1) & (jnp.arange(q_lens.shape[0]) < num_seqs)
    prefill_seqs = jnp.nonzero(is_prefill, size=q_lens.shape[0], fill_value=0)[0]
    out = decode_rows(jnp.zeros((num_tokens, n_heads, head_dim), jnp.float32))
    out = jax.lax.fori_loop(0, is_prefill.sum(), prefill_rows, out)
    return out.astype(q.dtype)


def _online_softmax(q, num_chunks, chunk_kv, eqs, scale):
    """Softmax attention of rows q [R, kv, g, D] over cache chunks, folded in one at a time
    (running max and sum, f32): chunk_kv(c) -> (k, v, visible [R, chunk]), k/v shared by the rows
    or one per row, as the einsums `eqs` (scores, then output) say. -> [R, kv, g, D] f32."""
    R, n_kv, group, head_dim = q.shape

    def one_chunk(c, carry):
        m, row_sum, acc = carry  # [R, kv, g] running max and sum, [R, kv, g, D] unnormalized output
        k, v, visible = chunk_kv(c)
        scores = jnp.einsum(eqs[0], q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible[:, None, None, :], scores, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum(eqs[1], p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, row_sum * correction + p.sum(-1), acc * correction[..., None] + pv

    init = (jnp.full((R, n_kv, group), MASK_VALUE, jnp.float32), jnp.zeros((R, n_kv, group), jnp.float32),
            jnp.zeros((R, n_kv, group, head_dim), jnp.float32))
    _, row_sum, acc = jax.lax.fori_loop(0, num_chunks, one_chunk, init)
    return acc / jnp.maximum(row_sum, 1e-30)[..., None]
