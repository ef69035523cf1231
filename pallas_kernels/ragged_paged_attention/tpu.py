"""Ragged paged attention as a Pallas TPU kernel (spec: `reference.py`).

Design. Grid = (max_seqs,): program s handles live sequence s (programs with s >= num_seqs do
nothing); the grid runs in order ("arbitrary"). kv_lens, page_indices, cu_q_lens, num_seqs and
layer are scalar-prefetch operands (SMEM). The packed queries, the pools and the output stay in
HBM (`memory_space=ANY`): VMEM holds one query block and one output block of `block_q` rows at a
time, whatever the step's token count (a whole-step q block would outgrow VMEM: 17 MiB at 512
tokens of Mistral-Small-2501, over v5e's scoped default; `vmem_bytes`). Inside a program: a loop
over query blocks of the sequence; each is copied in from its row cu_q_lens[s] + b * block_q (q is
padded by one block so it stays in bounds), then a loop over the sequence's pages: each
[page_size, n_kv_heads, head_dim] page of K and V (from the stacked 5-D pool with the layer index
in the DMA source, never sliced in XLA) is copied whole into a 2-slot VMEM buffer with
`make_async_copy`, page j+1 being fetched while page j is computed. DMA'd refs are only indexed,
never reshaped (the failure of the public kernels in interpret mode). Online softmax (flash
attention) in f32 per kv head over its group of query heads; scores at cache positions >= kv_len
are masked and those value rows zeroed, so stale NaN garbage cannot leak. The block is copied out
to the same rows, rows past the sequence as zeros: they belong to a later sequence, which writes
them after, or to padding. The output starts as zeros (an aliased operand), so rows no sequence
writes are exact zeros.

Shapes compile once per static (T, S, pages_per_seq, ...) bucket: num_seqs, kv_lens and
cu_q_lens are traced. What a real TPU needs: head_dim a multiple of 128 (pad it to 128 at cache
allocation for head_dim 24/64) and page_size a multiple of 8 (16 for bf16) for efficient DMA.
Interpret mode (CPU) accepts any of head_dim 24/64/128 and page_size 1..128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention.common import MASK_VALUE

__all__ = ["ragged_paged_attention_tpu", "vmem_bytes"]

_ANY = getattr(pltpu, "ANY", None) or getattr(pl, "ANY", None) or pltpu.MemorySpace.ANY
_SMEM = getattr(pltpu, "SMEM", None) or pltpu.MemorySpace.SMEM


def _interpret_arg(interpret: bool):
    if not interpret:
        return False
    if hasattr(pltpu, "InterpretParams"):
        return pltpu.InterpretParams()
    return True


def vmem_bytes(n_heads: int, n_kv: int, head_dim: int, page_size: int, dtype, *, block_q: int = 8) -> int:
    """VMEM one program uses, whatever the step's token count: the 2-slot K and V page buffers,
    the query and output blocks, and the f32 online-softmax state and temporaries of one query
    block (scores, probabilities and accumulators of every kv head's group, as the body holds
    them at once). Kept under each TPU generation's scoped VMEM limit by a test."""
    item = jnp.dtype(dtype).itemsize
    rows = block_q * (n_heads // n_kv)
    pages = 2 * 2 * page_size * n_kv * head_dim * item  # k_buf, v_buf
    blocks = 2 * block_q * n_heads * head_dim * item  # q_buf, o_buf
    state = n_kv * rows * (2 + head_dim) * 4 * 2  # m, row_sum, acc (and their next values)
    temps = n_kv * rows * (2 * page_size + head_dim) * 4 + n_kv * rows * head_dim * item  # scores, p, pv; q heads
    return pages + blocks + state + temps


def _kernel(kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref, layer_ref,
            q_hbm, k_hbm, v_hbm, _zeros_hbm, o_hbm, k_buf, v_buf, q_buf, o_buf, sem, io_sem,
            *, block_q, page_size, n_kv, group, scale, stacked):
    s = pl.program_id(0)
    kv_len = kv_lens_ref[s]
    q_start = cu_q_lens_ref[s]
    q_len = cu_q_lens_ref[s + 1] - q_start
    n_pages = (kv_len + page_size - 1) // page_size
    n_qblocks = (q_len + block_q - 1) // block_q
    live = (s < num_seqs_ref[0]) & (q_len > 0) & (n_pages > 0)
    head_dim = q_hbm.shape[-1]
    rows = block_q * group

    def copies(j, slot):
        page = page_indices_ref[s, j]
        if stacked:
            src_k, src_v = k_hbm.at[layer_ref[0], page], v_hbm.at[layer_ref[0], page]
        else:
            src_k, src_v = k_hbm.at[page], v_hbm.at[page]
        return (pltpu.make_async_copy(src_k, k_buf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(src_v, v_buf.at[slot], sem.at[1, slot]))

    def start(j, slot):
        for c in copies(j, slot):
            c.start()

    def wait(j, slot):
        for c in copies(j, slot):
            c.wait()

    @pl.when(live)
    def _():
        def q_block(b, carry):
            r0 = q_start + b * block_q
            fetch_q = pltpu.make_async_copy(q_hbm.at[pl.ds(r0, block_q)], q_buf, io_sem.at[0])
            fetch_q.start()
            fetch_q.wait()
            qblk = q_buf[...]  # [block_q, Hq, D]
            # Row r of the flattened [block_q * group] rows is query row r // group.
            qi = b * block_q + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
            q_pos = kv_len - q_len + qi  # [rows, 1]
            qh = [qblk[:, h * group:(h + 1) * group, :].reshape(rows, head_dim) for h in range(n_kv)]
            start(0, 0)

            def page_step(j, st):
                m, row_sum, acc = st
                slot = j % 2
                wait(j, slot)

                @pl.when(j + 1 < n_pages)
                def _():
                    start(j + 1, 1 - slot)

                kpage = k_buf[slot]  # [page_size, Hkv, D]
                vpage = v_buf[slot]
                kv_pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
                in_cache = kv_pos < kv_len
                visible = (kv_pos <= q_pos) & in_cache  # [rows, page_size]
                v_ok = (j * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)) < kv_len
                ms, ls, accs = [], [], []
                for h in range(n_kv):
                    k = kpage[:, h, :]
                    v = jnp.where(v_ok, vpage[:, h, :], jnp.zeros((), vpage.dtype))
                    sc = jax.lax.dot_general(qh[h], k, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32) * scale
                    sc = jnp.where(visible, sc, MASK_VALUE)
                    m_new = jnp.maximum(m[h], sc.max(axis=-1, keepdims=True))
                    alpha = jnp.exp(m[h] - m_new)
                    p = jnp.exp(sc - m_new)
                    ls.append(alpha * row_sum[h] + p.sum(axis=-1, keepdims=True))
                    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                    accs.append(alpha * acc[h] + pv)
                    ms.append(m_new)
                return jnp.stack(ms), jnp.stack(ls), jnp.stack(accs)

            init = (jnp.full((n_kv, rows, 1), -jnp.inf, jnp.float32),
                    jnp.zeros((n_kv, rows, 1), jnp.float32),
                    jnp.zeros((n_kv, rows, head_dim), jnp.float32))
            m, row_sum, acc = jax.lax.fori_loop(0, n_pages, page_step, init)
            out = acc / row_sum  # [Hkv, rows, D]; row_sum >= 1 since MASK_VALUE is finite
            out = jnp.concatenate([out[h].reshape(block_q, group, head_dim) for h in range(n_kv)], axis=1)
            # Rows past q_len belong to later sequences (written after this one: the grid runs in
            # order) or are padding: zeros here, their own values later.
            row_ok = (b * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1, 1), 0)) < q_len
            o_buf[...] = jnp.where(row_ok, out.astype(o_buf.dtype), jnp.zeros((), o_buf.dtype))
            write = pltpu.make_async_copy(o_buf, o_hbm.at[pl.ds(r0, block_q)], io_sem.at[1])
            write.start()
            write.wait()
            return carry

        jax.lax.fori_loop(0, n_qblocks, q_block, 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_q"))
def _rpa(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, layer,
         *, sm_scale, interpret, block_q):
    T, n_heads, head_dim = q.shape
    stacked = k_pages.ndim == 5
    page_size, n_kv, kd = k_pages.shape[-3:]
    S = page_indices.shape[0]
    group = n_heads // n_kv
    qp = jnp.pad(q, ((0, block_q), (0, 0), (0, 0)))
    kernel = functools.partial(_kernel, block_q=block_q, page_size=page_size, n_kv=n_kv,
                               group=group, scale=sm_scale, stacked=stacked)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(S,),
        in_specs=[pl.BlockSpec(memory_space=_ANY)] * 4,  # q, the k and v pools, the zeroed output
        out_specs=pl.BlockSpec(memory_space=_ANY),
        scratch_shapes=[pltpu.VMEM((2, page_size, n_kv, head_dim), k_pages.dtype),
                        pltpu.VMEM((2, page_size, n_kv, head_dim), v_pages.dtype),
                        pltpu.VMEM((block_q, n_heads, head_dim), q.dtype),
                        pltpu.VMEM((block_q, n_heads, head_dim), q.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)),
                        pltpu.SemaphoreType.DMA((2,))],
    )
    cp = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        # The output starts as zeros (operand 8, aliased): rows no live sequence writes stay 0.
        input_output_aliases={8: 0},
        compiler_params=cp(dimension_semantics=("arbitrary",)),
        interpret=_interpret_arg(interpret),
    )(kv_lens, page_indices, cu_q_lens, num_seqs, layer, qp, k_pages, v_pages, jnp.zeros_like(qp))
    return out[:T]


def ragged_paged_attention_tpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               *, layer=None, sm_scale=None, interpret=False, block_q=8):
    """Pallas TPU ragged paged attention; see the module docstrings. Returns [T, Hq, D] in q's
    dtype. `interpret=True` runs the kernel in TPU interpret mode (CPU)."""
    T, n_heads, head_dim = q.shape
    if k_pages.ndim not in (4, 5) or (k_pages.ndim == 5) != (layer is not None):
        raise ValueError("k_pages must be 4-D without `layer` or stacked 5-D with `layer`")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    page_size, n_kv, kd = k_pages.shape[-3:]
    if kd != head_dim:
        raise ValueError(f"pages head_dim {kd} != q head_dim {head_dim}")
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    if not 1 <= page_size <= 128:
        raise NotImplementedError(f"page_size={page_size}: supported 1..128")
    if not interpret and head_dim % 128:
        raise NotImplementedError(
            f"head_dim={head_dim} on a real TPU: pad head_dim to a multiple of 128 at cache "
            "allocation (interpret mode accepts any)")
    scale = float(head_dim**-0.5 if sm_scale is None else sm_scale)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    layer_arr = i32(0 if layer is None else layer).reshape(1)
    return _rpa(q, k_pages, v_pages, i32(kv_lens), i32(page_indices), i32(cu_q_lens),
                i32(num_seqs).reshape(1), layer_arr, sm_scale=scale, interpret=bool(interpret),
                block_q=int(block_q))
