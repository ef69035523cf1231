"""What every ragged paged attention implementation shares: the mask value, the packed rows'
sequence map, and the writer of a step's keys and values into the page pool (the layout is in
reference.py's docstring). The bottom of the family: it imports no other module of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["MASK_VALUE", "token_seq_ids", "write_kv_pages"]

# Finite, so that a row with nothing visible softmaxes to uniform weights instead of NaN.
MASK_VALUE = -1e30


def token_seq_ids(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> jax.Array:
    """[num_tokens] int32: the sequence each packed query row belongs to, -1 for padding rows
    (rows at or past cu_q_lens[num_seqs])."""
    cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    # cu_q_lens[s] <= row < cu_q_lens[s+1]  <=>  s = (number of cu entries <= row) - 1.
    # side="right" skips zero-length sequences (repeated cu entries) correctly.
    seq = jnp.searchsorted(cu_q_lens, rows, side="right").astype(jnp.int32) - 1
    live = rows < cu_q_lens[num_seqs]
    return jnp.where(live, seq, -1)


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    layer: jax.Array | None = None,
    trash_slot: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's keys/values into the page pool.

    k_pages, v_pages: [num_pages, page_size, n_kv_heads, head_dim], or with `layer` the
    stacked [n_layers, num_pages, ...] pools (written in place under donation: no layer copy);
    k_new, v_new: [num_tokens, n_kv_heads, head_dim]; slot_mapping: [num_tokens] int32 flat
    slot page * page_size + offset. Negative or out-of-range slots (padding) are dropped, or with
    `trash_slot` (a slot nobody reads, e.g. in a null page) written there: one token is then a
    plain dynamic-update-slice. (XLA makes a one-index scatter a dynamic-update-slice too, but
    with the old value read and selected for the drop and the index checked and wrapped: three
    more small kernels a layer on the GPU.)
    Returns the updated (k_pages, v_pages), in the pages' dtype.
    """
    *lead, num_pages, page_size, n_kv, head_dim = k_pages.shape
    n_slots = num_pages * page_size
    slot = jnp.asarray(slot_mapping, jnp.int32)
    # JAX wraps negative indices even with mode="drop", so send them out of range explicitly.
    in_range = (slot >= 0) & (slot < n_slots)
    slot = jnp.where(in_range, slot, n_slots if trash_slot is None else trash_slot)

    def scatter(pages, new):
        flat = pages.reshape(*lead, n_slots, n_kv, head_dim)
        new = new.astype(pages.dtype)
        if trash_slot is not None and slot.shape[0] == 1:  # one token, in range: a plain update slice
            start = ((layer,) if layer is not None else ()) + (slot[0], 0, 0)
            flat = jax.lax.dynamic_update_slice(flat, new.reshape((1,) * len(lead) + new.shape), start)
        else:
            flat = flat.at[(layer, slot) if layer is not None else (slot,)].set(new, mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k_new), scatter(v_pages, v_new)
