"""The Pallas GPU (Triton lowering) ragged paged attention kernel against the jnp reference.

CPU: Pallas interpret mode (small shapes). GPU (`pytest -m gpu`, on the device): the compiled
kernel at the Mistral-Small shape and a few ragged mixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    attention_schedule,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention.triton import plan, ragged_paged_attention_triton
from tests.test_ragged_paged_attention import make_batch, mixed_seqs, numpy_oracle, rel_err


def run_check(args, tol, *, interpret=True, oracle=False, tuning=None, **kw):
    a = [jnp.asarray(x) for x in args]
    out = ragged_paged_attention_triton(*a, interpret=interpret, **kw, **(tuning or {}))
    if oracle:
        ref = numpy_oracle(*(np.asarray(x, np.float32) if i < 3 else np.asarray(x)
                             for i, x in enumerate(args)), **{k: v for k, v in kw.items()
                                                             if k == "sm_scale"})
    else:
        ref = np.asarray(ragged_paged_attention_reference(*a, **kw), np.float64)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    err = rel_err(out, ref)
    assert err < tol, err
    end = int(args[5][int(args[6])])
    assert (np.asarray(out[end:], np.float32) == 0).all()
    return out


# (page_size, n_heads, n_kv, head_dim): page sizes 1/4/16, GQA 1/2/3/4, head_dim 24/64/128.
@pytest.mark.parametrize("page_size,n_heads,n_kv,head_dim", [
    (1, 4, 4, 24), (4, 4, 2, 64), (16, 8, 2, 128), (4, 8, 2, 24), (16, 4, 4, 64),
    (1, 8, 2, 64), (4, 6, 2, 24)])
def test_mixed_batch_f32(page_size, n_heads, n_kv, head_dim):
    rng = np.random.default_rng(page_size * 7 + n_heads + head_dim)
    args = make_batch(rng, mixed_seqs(page_size), page_size=page_size, n_heads=n_heads,
                      n_kv=n_kv, head_dim=head_dim, max_seqs=8)  # 2 empty slots
    run_check(args, 1e-5)


@pytest.mark.parametrize("page_size,n_kv", [(4, 2), (16, 1)])
def test_mixed_batch_bf16(page_size, n_kv):
    rng = np.random.default_rng(11 + page_size)
    args = make_batch(rng, mixed_seqs(page_size), page_size=page_size, n_heads=8 if n_kv == 2 else 4,
                      n_kv=n_kv, head_dim=128, max_seqs=7, dtype=jnp.bfloat16)
    run_check(args, 2e-2)


def test_against_float64_oracle():
    rng = np.random.default_rng(21)
    args = make_batch(rng, mixed_seqs(4), page_size=4, n_heads=8, n_kv=2, head_dim=24,
                      max_seqs=6)
    run_check(args, 1e-5, oracle=True)


@pytest.mark.slow
def test_long_prefill_tiles_and_kv_splits():
    """A chunk longer than one prefill tile (several query tiles, causal limit per tile) next
    to decodes whose KV is split across several programs (forced num_splits)."""
    rng = np.random.default_rng(31)
    cfg = plan(T=80, S=4, Hq=4, Hkv=2, D=24)
    n = cfg["bq_pre"] * 2 + 3
    seqs = [(n, n + 5), (1, 150), (2, 77), (1, 64)]
    args = make_batch(rng, seqs, page_size=4, n_heads=4, n_kv=2, head_dim=24, max_seqs=4)
    run_check(args, 1e-5, tuning=dict(num_splits=4))
    run_check(args, 1e-5, tuning=dict(num_splits=3))  # the combine pads the splits to a power of two
    run_check(args, 1e-5, tuning=dict(num_splits=1, block_k_dec=16, block_k_pre=32))



def test_short_contexts_fill_few_splits():
    """Decodes whose contexts fill 1, 3, 6 and all 16 of 16 splits (block 16): the empty splits
    store nothing and the combine reads only the filled ones."""
    rng = np.random.default_rng(33)
    args = make_batch(rng, [(1, 5), (1, 40), (2, 90), (1, 250)], page_size=4, n_heads=8, n_kv=2, head_dim=24,
                      max_seqs=5)
    run_check(args, 1e-5, tuning=dict(num_splits=16, block_k_dec=16))


def test_combine_reads_only_the_filled_splits():
    """The combine's merge of a decode tile's partials, against numpy over the splits that hold
    blocks; the other splits hold NaN (what an empty split leaves: it stores nothing)."""
    from pallas_kernels.ragged_paged_attention.triton import _combine

    rng = np.random.default_rng(34)
    NS, S, BQ, Hkv, G, D, BK = 8, 3, 4, 2, 3, 24, 16
    kv_lens = np.array([5, 40, 300], np.int32)  # 1, 3 and 7 of 8 splits filled (300: 19 blocks, 3 a split)
    used = [1, 3, 7]
    o = rng.standard_normal((NS, S, BQ + 1, Hkv, G, D)).astype(np.float32)
    lse = (rng.standard_normal((NS, S, BQ + 1, Hkv, G)) * 3).astype(np.float32)
    for s, n in enumerate(used):
        o[n:, s], lse[n:, s] = np.nan, np.nan
    seq_c = np.array([0, 1, 2, 2], np.int32)  # packed rows: one decode token each, the last row padding
    tok, row_dec = np.zeros(4, np.int32), np.array([1, 1, 1, 0], np.int32)
    out = np.asarray(_combine(*map(jnp.asarray, (o, lse, seq_c, tok, row_dec, kv_lens)), jnp.float32, BK=BK,
                              interpret=True))
    for t, s in enumerate(seq_c[:3]):
        w = np.exp2(lse[: used[s], s, 0] - lse[: used[s], s, 0].max(axis=0))  # [n, Hkv, G]
        want = (o[: used[s], s, 0] * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6)
    assert (out[3] == 0).all()


def test_zero_length_queries_empty_slots_and_sm_scale():
    rng = np.random.default_rng(4)
    args = make_batch(rng, [(2, 5), (0, 7), (1, 4), (0, 0)], page_size=4, n_heads=4, n_kv=2,
                      head_dim=24, max_seqs=6)
    run_check(args, 1e-5, sm_scale=0.3)
    q, kp, vp, kvl, pi, cu, _ = args
    out = ragged_paged_attention_triton(*(jnp.asarray(x) for x in (q, kp, vp, kvl, pi, cu)),
                                        jnp.int32(0), interpret=True)
    assert (np.asarray(out) == 0).all()


def _poison(kp, vp, pi, kvl, ns, page_size):
    kp, vp = np.array(kp), np.array(vp)
    used = {(pi[s, p // page_size], p % page_size) for s in range(int(ns))
            for p in range(int(kvl[s]))}
    for page in range(kp.shape[0]):
        for off in range(page_size):
            if (page, off) not in used:
                kp[page, off] = np.nan
                vp[page, off] = np.inf
    return kp, vp


def test_nan_garbage_does_not_leak_stacked_layer():
    rng = np.random.default_rng(5)
    q, kp, vp, kvl, pi, cu, ns = make_batch(rng, [(1, 6), (2, 3), (9, 12)], page_size=4,
                                            n_heads=4, n_kv=2, head_dim=24, max_seqs=4)
    ref = numpy_oracle(q, kp, vp, kvl, pi, cu, ns)
    kp, vp = _poison(kp, vp, pi, kvl, ns, 4)
    ks = np.full((3,) + kp.shape, np.nan, np.float32)  # other layers are NaN
    vs = np.full((3,) + vp.shape, np.nan, np.float32)
    ks[1], vs[1] = kp, vp
    pi = pi.copy()
    pi[3] = -7  # garbage block-table row of an empty slot
    out = ragged_paged_attention_triton(*(jnp.asarray(a) for a in (q, ks, vs, kvl, pi, cu, ns)),
                                        layer=jnp.int32(1), interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-5


def test_dispatcher_and_one_compile():
    rng = np.random.default_rng(6)
    calls = []

    @jax.jit
    def f(*a):
        calls.append(1)
        return ragged_paged_attention(*a, impl="triton", interpret=True)

    for seqs in ([(1, 5), (3, 9)], [(4, 9), (1, 1)], [(1, 2), (1, 9), (2, 3)]):
        # Same max kv (same pool and block-table shapes) and T = 8 in every batch.
        args = make_batch(rng, seqs, page_size=4, n_heads=4, n_kv=2, head_dim=24, max_seqs=3,
                          pad_tokens=8 - sum(ql for ql, _ in seqs))
        a = [jnp.asarray(x) for x in args]
        out = f(*a)
        ref = ragged_paged_attention_reference(*a)
        assert rel_err(out, np.asarray(ref, np.float64)) < 1e-5
    assert len(calls) == 1


def test_schedule_built_once_for_every_layer():
    """The layer loop passes one attention_schedule() to every layer's call (PagedKVCache.prepare):
    over a stacked pool, each layer's output with it equals the reference's for that layer."""
    rng = np.random.default_rng(8)
    seqs = [(1, 7), (6, 6), (1, 13), (9, 14)]  # decode rows and prefill chunks in one batch
    q, kp, vp, kvl, pi, cu, ns = make_batch(rng, seqs, page_size=4, n_heads=8, n_kv=2, head_dim=24, max_seqs=5)
    layers = 3
    ks = np.stack([kp] + [rng.standard_normal(kp.shape).astype(np.float32) for _ in range(layers - 1)])
    vs = np.stack([vp] + [rng.standard_normal(vp.shape).astype(np.float32) for _ in range(layers - 1)])
    q, ks, vs, kvl, pi, cu, ns = (jnp.asarray(a) for a in (q, ks, vs, kvl, pi, cu, ns))

    @jax.jit
    def all_layers(q, ks, vs):
        sched = attention_schedule("triton", q.shape[0], q.shape[1], ks, kvl, pi, cu, ns)
        return [ragged_paged_attention(q, ks, vs, kvl, pi, cu, ns, layer=jnp.int32(i), impl="triton",
                                       interpret=True, schedule=sched) for i in range(layers)]

    assert attention_schedule("reference", q.shape[0], q.shape[1], ks, kvl, pi, cu, ns) is None
    for i, out in enumerate(all_layers(q, ks, vs)):
        ref = ragged_paged_attention_reference(q, ks, vs, kvl, pi, cu, ns, layer=jnp.int32(i))
        assert rel_err(out, np.asarray(ref, np.float64)) < 1e-5


def test_unsupported_group_raises():
    q = jnp.ones((2, 32, 16), jnp.float32)
    kp = jnp.ones((4, 4, 1, 16), jnp.float32)
    with pytest.raises(NotImplementedError, match="GQA group 32"):
        ragged_paged_attention_triton(q, kp, kp, jnp.ones(1, jnp.int32),
                                      jnp.zeros((1, 1), jnp.int32), jnp.array([0, 2], jnp.int32),
                                      jnp.int32(1), interpret=True)


# ------------------------------------------------------------------------------------------
def test_lowers_for_cuda_at_mistral_small_decode():
    # CI has no GPU: lowering for CUDA (Triton's own checks) at 2501's decode shapes, a stacked
    # 40-layer pool, catches what interpret mode lets through. Launches: decode, its combine and
    # the prefill tiles (a bucket of 8 rows may hold a prefill chunk).
    T, S, Hq, Hkv, D = 8, 8, 32, 8, 128
    pool = jax.ShapeDtypeStruct((40, 64, 16, Hkv, D), jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    fn = jax.jit(lambda q, k, v, lens, pages, cu, n, layer: ragged_paged_attention_triton(
        q, k, v, lens, pages, cu, n, layer=layer))
    text = fn.trace(jax.ShapeDtypeStruct((T, Hq, D), jnp.bfloat16), pool, pool, i32(S), i32(S, 16), i32(S + 1),
                    i32(), i32()).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


# GPU (run on the device: python -m pytest -q -m gpu tests/test_ragged_paged_attention_triton.py)
# ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
class TestGPU:
    @pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)])
    @pytest.mark.parametrize("page_size", [16, 1, 128])
    def test_mistral_shape_mixed(self, dtype, tol, page_size):
        rng = np.random.default_rng(page_size)
        seqs = [(1, 1), (1, 2 * page_size), (1, 2 * page_size + 1), (1, 1000), (300, 700),
                (37, 37), (5, 4096 + 1)]
        args = make_batch(rng, seqs, page_size=page_size, n_heads=32, n_kv=8, head_dim=128,
                          max_seqs=10, dtype=dtype)
        # f32: against the float64 oracle (XLA's f32 reference on the GPU uses TF32 dots).
        run_check(args, tol, interpret=False, oracle=dtype == jnp.float32)

    @pytest.mark.parametrize("n_heads,n_kv,head_dim,page_size", [
        (4, 4, 24, 4), (8, 4, 64, 16), (12, 4, 64, 8), (32, 8, 128, 32)])
    def test_ragged_shapes(self, n_heads, n_kv, head_dim, page_size):
        rng = np.random.default_rng(n_heads + head_dim)
        seqs = [(1, 3000), (17, 17), (1, 5), (0, 9), (130, 260), (1, page_size)]
        args = make_batch(rng, seqs, page_size=page_size, n_heads=n_heads, n_kv=n_kv,
                          head_dim=head_dim, max_seqs=8, dtype=jnp.bfloat16)
        run_check(args, 2e-2, interpret=False)

    def test_decode_batch_long_context_stacked(self):
        rng = np.random.default_rng(9)
        seqs = [(1, int(n)) for n in rng.integers(1, 20000, size=16)]
        q, kp, vp, kvl, pi, cu, ns = make_batch(rng, seqs, page_size=16, n_heads=32, n_kv=8,
                                                head_dim=128, max_seqs=16, dtype=jnp.bfloat16)
        ks = jnp.stack([jnp.full_like(kp, jnp.nan), kp])
        vs = jnp.stack([jnp.full_like(vp, jnp.nan), vp])
        a = [jnp.asarray(x) for x in (q, ks, vs, kvl, pi, cu, ns)]
        out = ragged_paged_attention_triton(*a, layer=jnp.int32(1))
        ref = ragged_paged_attention_reference(*a, layer=jnp.int32(1))
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel_err(out, np.asarray(ref, np.float64)) < 2e-2
