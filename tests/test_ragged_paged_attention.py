"""The jnp reference of ragged paged attention against a float64 NumPy oracle, and against the
dense cache's attention for the same sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.cache.kv_cache import DenseKVCache
from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    token_seq_ids,
    write_kv_pages,
)


def numpy_oracle(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=None):
    """Straightforward float64: loop over sequences, contiguous K/V from the pages, causal mask.
    Rows of no live sequence are zeros."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    T, H, D = q.shape
    page_size, KV = k_pages.shape[1], k_pages.shape[2]
    G = H // KV
    scale = D**-0.5 if sm_scale is None else sm_scale
    out = np.zeros((T, H, D))
    for s in range(int(num_seqs)):
        kv_len = int(kv_lens[s])
        q0, q1 = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
        q_len = q1 - q0
        pos = np.arange(kv_len)
        pages = page_indices[s][pos // page_size]
        k = k_pages[pages, pos % page_size]  # [kv_len, KV, D]
        v = v_pages[pages, pos % page_size]
        for i in range(q_len):
            p = kv_len - q_len + i
            for h in range(H):
                sc = k[: p + 1, h // G] @ q[q0 + i, h] * scale
                w = np.exp(sc - sc.max())
                out[q0 + i, h] = (w / w.sum()) @ v[: p + 1, h // G]
    return out


def make_batch(rng, seqs, *, page_size, n_heads, n_kv, head_dim, max_seqs, pad_tokens=3,
               extra_pages=2, dtype=jnp.float32):
    """seqs: list of (q_len, kv_len) for the live slots. Pages are a random permutation of the
    pool (non-contiguous block tables); every array is random and nonzero, including unused
    pages, block-table entries of empty slots, and padding query rows."""
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs) + 1
    num_pages = max_seqs * pages_per_seq + extra_pages
    num_tokens = sum(ql for ql, _ in seqs) + pad_tokens
    perm = rng.permutation(num_pages)
    page_indices = perm[: max_seqs * pages_per_seq].reshape(max_seqs, pages_per_seq).astype(np.int32)
    kv_lens = np.zeros(max_seqs, np.int32)
    cu = np.zeros(max_seqs + 1, np.int32)
    for s, (ql, kv) in enumerate(seqs):
        kv_lens[s] = kv
        cu[s + 1] = cu[s] + ql
    cu[len(seqs) + 1:] = cu[len(seqs)]
    rnd = lambda *shape: (rng.standard_normal(shape) + 0.1).astype(np.float32)  # noqa: E731
    q = jnp.asarray(rnd(num_tokens, n_heads, head_dim), dtype)
    k_pages = jnp.asarray(rnd(num_pages, page_size, n_kv, head_dim), dtype)
    v_pages = jnp.asarray(rnd(num_pages, page_size, n_kv, head_dim), dtype)
    return q, k_pages, v_pages, kv_lens, page_indices, cu, np.int32(len(seqs))


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def check(args, tol, **kw):
    out = ragged_paged_attention_reference(*(jnp.asarray(a) for a in args), **kw)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = numpy_oracle(*(np.asarray(a, np.float32) if i < 3 else np.asarray(a)
                         for i, a in enumerate(args)), **kw)
    err = rel_err(out, ref)
    assert err < tol, err
    # Padding rows past cu_q_lens[num_seqs] are exact zeros.
    end = int(args[5][int(args[6])])
    assert (np.asarray(out[end:], np.float32) == 0).all()
    return out


# Mixed batch: decode (q_len=1), prefill chunks with prior cached context, a full first prefill,
# length-1 sequences, kv lengths exactly on and one past page boundaries.
def mixed_seqs(page_size):
    P = page_size
    return [
        (1, 1),                # length-1 sequence
        (1, 2 * P),            # decode, kv exactly on a page boundary
        (1, 2 * P + 1),        # decode, one past a boundary
        (3, 3 * P + 1),        # prefill chunk with cached context, one past a boundary
        (min(5, 3 * P), 3 * P),  # chunk ending on a page boundary
        (P + 2, P + 2),        # whole first prefill (no prior context)
    ]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("head_dim", [24, 128])
def test_matches_oracle_f32(page_size, n_heads, n_kv, head_dim):
    rng = np.random.default_rng(page_size * 100 + n_heads * 10 + n_kv + head_dim)
    args = make_batch(rng, mixed_seqs(page_size), page_size=page_size, n_heads=n_heads, n_kv=n_kv,
                      head_dim=head_dim, max_seqs=8)  # 2 empty slots
    check(args, 1e-5)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 1), (8, 2)])
def test_matches_oracle_bf16(page_size, n_heads, n_kv):
    rng = np.random.default_rng(7 + page_size)
    args = make_batch(rng, mixed_seqs(page_size), page_size=page_size, n_heads=n_heads, n_kv=n_kv,
                      head_dim=128, max_seqs=7, dtype=jnp.bfloat16)
    check(args, 2e-2)


def test_sm_scale_and_single_decode():
    rng = np.random.default_rng(3)
    args = make_batch(rng, [(1, 9)], page_size=4, n_heads=2, n_kv=1, head_dim=24, max_seqs=3,
                      pad_tokens=0)
    check(args, 1e-5, sm_scale=0.3)


def test_zero_length_queries_and_no_live_sequences():
    rng = np.random.default_rng(4)
    # A live slot with no new queries between two others.
    args = make_batch(rng, [(2, 5), (0, 7), (1, 4)], page_size=4, n_heads=4, n_kv=2, head_dim=24,
                      max_seqs=4)
    check(args, 1e-5)
    ids = token_seq_ids(jnp.asarray(args[5]), jnp.asarray(args[6]), args[0].shape[0])
    np.testing.assert_array_equal(np.asarray(ids), [0, 0, 2, -1, -1, -1])
    # num_seqs = 0: everything is padding, output all zeros.
    q, kp, vp, kvl, pi, cu, _ = args
    out = ragged_paged_attention_reference(q, kp, vp, kvl, pi, cu, jnp.int32(0))
    assert (np.asarray(out) == 0).all()


def test_garbage_beyond_kv_len_does_not_leak():
    rng = np.random.default_rng(5)
    q, kp, vp, kvl, pi, cu, ns = make_batch(rng, [(1, 6), (2, 3)], page_size=4, n_heads=4, n_kv=2,
                                            head_dim=24, max_seqs=3)
    ref = numpy_oracle(q, kp, vp, kvl, pi, cu, ns)
    # Poison every slot at or past kv_len of each live sequence, and every other page.
    kp, vp = np.array(kp), np.array(vp)
    used = set()
    for s in range(int(ns)):
        for p in range(int(kvl[s])):
            used.add((pi[s, p // 4], p % 4))
    for page in range(kp.shape[0]):
        for off in range(4):
            if (page, off) not in used:
                kp[page, off] = np.nan
                vp[page, off] = np.inf
    out = ragged_paged_attention_reference(*(jnp.asarray(a) for a in (q, kp, vp, kvl, pi, cu, ns)))
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-5


def test_jit_one_compile_many_batches():
    traces = []

    @jax.jit
    def f(*a):
        traces.append(1)
        return ragged_paged_attention_reference(*a)

    rng = np.random.default_rng(6)
    shapes = dict(page_size=4, n_heads=4, n_kv=2, head_dim=24, max_seqs=4)
    # Same static shapes (pages_per_seq=4, 18 pages, 8 tokens), different ragged contents.
    for seqs, pad in ([(1, 9), (3, 12), (2, 2)], 2), ([(5, 11), (1, 1)], 2), ([(1, 12)], 7):
        args = make_batch(rng, seqs, pad_tokens=pad, **shapes)
        assert args[4].shape == (4, 4) and args[0].shape[0] == 8
        out = f(*(jnp.asarray(a) for a in args))
        ref = numpy_oracle(*args)
        assert rel_err(out, ref) < 1e-5
    assert len(traces) == 1


def test_write_kv_pages_drops_padding():
    k_pages = jnp.ones((3, 2, 1, 4))
    v_pages = jnp.ones((3, 2, 1, 4)) * 2
    k_new = jnp.arange(4 * 4, dtype=jnp.float32).reshape(4, 1, 4) + 10
    v_new = -k_new
    slots = jnp.array([5, -1, 0, 6], jnp.int32)  # -1 and 6 (== num slots) are padding
    kp, vp = write_kv_pages(k_pages, v_pages, k_new, v_new, slots)
    ekp, evp = np.ones((6, 1, 4)), np.ones((6, 1, 4)) * 2
    ekp[5], ekp[0] = k_new[0], k_new[2]
    evp[5], evp[0] = v_new[0], v_new[2]
    np.testing.assert_array_equal(np.asarray(kp), ekp.reshape(3, 2, 1, 4))
    np.testing.assert_array_equal(np.asarray(vp), evp.reshape(3, 2, 1, 4))


def test_write_kv_pages_trash_slot():
    # With trash_slot, padding goes there (an unconditional write) and every other slot gets
    # what the dropping write gives; stacked pools, the layer asked for only.
    k_pages = jnp.ones((2, 3, 2, 1, 4))
    v_pages = jnp.ones((2, 3, 2, 1, 4)) * 2
    k_new = jnp.arange(4 * 4, dtype=jnp.float32).reshape(4, 1, 4) + 10
    v_new = -k_new
    slots = jnp.array([5, -1, 3, 6], jnp.int32)  # -1 and 6 (== num slots) are padding
    kd, vd = write_kv_pages(k_pages, v_pages, k_new, v_new, slots, layer=jnp.int32(1))
    kt, vt = write_kv_pages(k_pages, v_pages, k_new, v_new, slots, layer=jnp.int32(1), trash_slot=0)
    for dropped, trashed, new in ((kd, kt, k_new), (vd, vt, v_new)):
        d, t = np.asarray(dropped).reshape(2, 6, 1, 4), np.asarray(trashed).reshape(2, 6, 1, 4)
        np.testing.assert_array_equal(t[:, 1:], d[:, 1:])
        np.testing.assert_array_equal(t[0], d[0])  # the other layer untouched
        assert any((t[1, 0] == new[i]).all() for i in (1, 3))  # one padding row landed in the trash
    # One token (a plain update slice): in range, then padding into the trash slot.
    for slot, at in ((4, 4), (-1, 0), (6, 0)):
        kt, _ = write_kv_pages(k_pages, v_pages, k_new[:1], v_new[:1], jnp.array([slot], jnp.int32),
                               layer=jnp.int32(1), trash_slot=0)
        want = np.ones((2, 6, 1, 4))
        want[1, at] = k_new[0]
        np.testing.assert_array_equal(np.asarray(kt).reshape(2, 6, 1, 4), want)


def test_write_then_attend_matches_dense_cache():
    """Two serving steps over paged KV (a ragged prefill, then mixed decode + chunk) equal the
    dense cache's attend for the same sequences."""
    rng = np.random.default_rng(8)
    B, H, KV, D, P, max_len = 3, 8, 2, 24, 4, 16
    pages_per_seq = max_len // P
    num_pages = B * pages_per_seq + 3
    page_indices = rng.permutation(num_pages)[: B * pages_per_seq].reshape(B, pages_per_seq)
    page_indices = jnp.asarray(page_indices, jnp.int32)
    k_pages = jnp.asarray(rng.standard_normal((num_pages, P, KV, D)), jnp.float32)  # stale junk
    v_pages = jnp.asarray(rng.standard_normal((num_pages, P, KV, D)), jnp.float32)
    dense = DenseKVCache(k=jnp.zeros((1, B, max_len, KV, D)), v=jnp.zeros((1, B, max_len, KV, D)))
    attend = jax.jit(ragged_paged_attention_reference)

    lens = np.zeros(B, np.int32)
    for step_q_lens in ([5, 1, 8], [1, 3, 1]):
        t_max, T = max(step_q_lens), sum(step_q_lens) + 2  # 2 padding rows
        q = rng.standard_normal((B, t_max, H, D)).astype(np.float32)
        k = rng.standard_normal((B, t_max, KV, D)).astype(np.float32)
        v = rng.standard_normal((B, t_max, KV, D)).astype(np.float32)
        positions = np.full((B, t_max), -1, np.int32)
        # Pack the ragged step.
        qp, kn, vn = (np.zeros((T,) + x.shape[2:], np.float32) for x in (q, k, v))
        slots = np.full(T, -1, np.int32)
        cu = np.zeros(B + 1, np.int32)
        for b, ql in enumerate(step_q_lens):
            cu[b + 1] = cu[b] + ql
            pos = lens[b] + np.arange(ql)
            positions[b, :ql] = pos
            rows = slice(cu[b], cu[b + 1])
            qp[rows], kn[rows], vn[rows] = q[b, :ql], k[b, :ql], v[b, :ql]
            slots[rows] = np.asarray(page_indices)[b, pos // P] * P + pos % P
        lens += np.asarray(step_q_lens, np.int32)

        k_pages, v_pages = write_kv_pages(k_pages, v_pages, jnp.asarray(kn), jnp.asarray(vn),
                                          jnp.asarray(slots))
        out = attend(jnp.asarray(qp), k_pages, v_pages, jnp.asarray(lens), page_indices,
                     jnp.asarray(cu), jnp.int32(B))
        want, dense = dense.attend(jnp.int32(0), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   jnp.asarray(positions))
        want_packed = np.concatenate([np.asarray(want)[b, :ql] for b, ql in enumerate(step_q_lens)])
        out = np.asarray(out)
        assert np.isfinite(out).all()
        assert rel_err(out[: cu[B]], want_packed.astype(np.float64)) < 1e-5
        assert (out[cu[B]:] == 0).all()
