"""Ragged paged attention, the family's one entry point: `ragged_paged_attention` runs the
implementation `impl` names, a Pallas kernel or the jnp twin of the same function.

    reference.py  the plain-jnp spec: layout, semantics and masking in its docstring
    triton.py     Pallas GPU (Triton lowering), with the per-step schedule its launches share
    tpu.py        Pallas TPU
    common.py     the mask value, the packed rows' sequence map, the page writer

Imports run downwards only: this dispatcher imports the kernels (when it runs them), the
kernels import common, never this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import MASK_VALUE, token_seq_ids, write_kv_pages
from pallas_kernels.ragged_paged_attention.reference import KV_CHUNK_TOKENS, ragged_paged_attention_reference

__all__ = ["MASK_VALUE", "KV_CHUNK_TOKENS", "IMPLS", "default_impl", "attention_schedule", "ragged_paged_attention",
           "ragged_paged_attention_reference", "write_kv_pages", "token_seq_ids"]

# The implementations a caller may name ("auto": the one for the default backend).
IMPLS = ("auto", "reference", "triton", "tpu")


def default_impl(platform: str | None = None) -> str:
    """The kernel for a backend: Triton on GPU, Pallas TPU on TPU, the reference elsewhere."""
    platform = platform or jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "tpu": "tpu"}.get(platform, "reference")


def attention_schedule(impl: str, num_tokens: int, n_heads: int, k_pages: jax.Array, kv_lens: jax.Array,
                       page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array):
    """What `impl`'s kernel derives from a step's layout alone (kv_lens, page_indices, cu_q_lens,
    num_seqs), the same for every layer: build it once before the layer loop and pass it to each
    ragged_paged_attention call as `schedule`. None where the implementation needs nothing."""
    if (default_impl() if impl == "auto" else impl) != "triton":
        return None
    from pallas_kernels.ragged_paged_attention.triton import schedule

    return schedule(kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens=num_tokens, n_heads=n_heads,
                    n_kv_heads=k_pages.shape[-2], head_dim=k_pages.shape[-1])


def ragged_paged_attention(
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
    impl: str = "auto",
    interpret: bool = False,
    mesh=None,
    head_axis: str = "tp",
    schedule=None,
) -> jax.Array:
    """Ragged paged attention (see reference.py's docstring) by the implementation `impl`:
    "reference" (plain jnp), "triton" (Pallas GPU), "tpu" (Pallas TPU) or "auto" (the one for
    the default backend). `interpret=True` runs a Pallas kernel in interpret mode (CPU tests).

    mesh: a jax Mesh whose axis `head_axis` splits q's heads and the pools' kv heads. XLA cannot
    partition a Pallas call, so a kernel then runs under `shard_map`, once per head shard on its
    own heads (whole GQA groups: the axis must divide n_kv_heads), everything else replicated.
    The reference is plain jnp, which XLA partitions by itself.

    schedule: attention_schedule() of this step (the same impl), or None to derive it here."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = default_impl()
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, layer=layer, sm_scale=sm_scale)
    if impl == "triton":
        from pallas_kernels.ragged_paged_attention.triton import ragged_paged_attention_triton as kernel
    else:  # the TPU kernel takes no schedule
        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu

        kernel = lambda *a, schedule, **kw: ragged_paged_attention_tpu(*a, **kw)  # noqa: E731
    shards = 1 if mesh is None else mesh.shape.get(head_axis, 1)
    if shards == 1:
        return kernel(*args, layer=layer, sm_scale=sm_scale, interpret=interpret, schedule=schedule)
    if k_pages.shape[-2] % shards:
        raise ValueError(f"{head_axis}={shards} does not divide n_kv_heads={k_pages.shape[-2]}")
    from jax.sharding import PartitionSpec as P

    layer = jnp.int32(0) if layer is None else jnp.asarray(layer, jnp.int32)
    heads = P(None, head_axis, None)  # q, out: [T, heads, D]
    pools = P(*(None,) * (k_pages.ndim - 2), head_axis, None)  # [(L,) P, page_size, kv_heads, D]
    stacked = k_pages.ndim == 5

    def local(q, k, v, lens, pages, cu, n, layer, schedule):  # the schedule holds no head: the same on every shard
        return kernel(q, k, v, lens, pages, cu, n, layer=layer if stacked else None, sm_scale=sm_scale,
                      interpret=interpret, schedule=schedule)

    return jax.shard_map(local, mesh=mesh, in_specs=(heads, pools, pools, P(), P(), P(), P(), P(), P()),
                         out_specs=heads, check_vma=False)(*args, layer, schedule)
