"""The Pallas TPU ragged paged attention kernel (TPU interpret mode on CPU) against the jnp
reference and the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
from tests.test_ragged_paged_attention import make_batch, mixed_seqs, numpy_oracle, rel_err


def run_check(args, tol, **kw):
    a = [jnp.asarray(x) for x in args]
    out = ragged_paged_attention_tpu(*a, interpret=True, **kw)
    ref = ragged_paged_attention_reference(*a, **kw)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, np.asarray(ref, np.float64)) < tol
    end = int(args[5][int(args[6])])
    assert (np.asarray(out[end:], np.float32) == 0).all()
    return out


@pytest.mark.parametrize("page_size,n_heads,n_kv,head_dim", [
    (1, 4, 4, 24), (4, 4, 2, 64), (16, 8, 2, 128), (4, 8, 2, 24), (16, 4, 4, 64)])
def test_matches_reference_f32(page_size, n_heads, n_kv, head_dim):
    rng = np.random.default_rng(page_size + n_heads + head_dim)
    args = make_batch(rng, mixed_seqs(page_size), page_size=page_size, n_heads=n_heads,
                      n_kv=n_kv, head_dim=head_dim, max_seqs=8)  # 2 empty slots
    run_check(args, 1e-5)


def test_matches_reference_bf16():
    rng = np.random.default_rng(1)
    args = make_batch(rng, mixed_seqs(4), page_size=4, n_heads=8, n_kv=2, head_dim=128,
                      max_seqs=7, dtype=jnp.bfloat16)
    run_check(args, 2e-2)


@pytest.mark.slow
def test_zero_length_queries_and_sm_scale():
    rng = np.random.default_rng(4)
    args = make_batch(rng, [(2, 5), (0, 7), (1, 4)], page_size=4, n_heads=4, n_kv=2,
                      head_dim=24, max_seqs=4)
    run_check(args, 1e-5, sm_scale=0.3)
    q, kp, vp, kvl, pi, cu, _ = args
    out = ragged_paged_attention_tpu(q, kp, vp, kvl, pi, cu, jnp.int32(0), interpret=True)
    assert (np.asarray(out) == 0).all()


def test_nan_garbage_does_not_leak_stacked_layer():
    rng = np.random.default_rng(5)
    q, kp, vp, kvl, pi, cu, ns = make_batch(rng, [(1, 6), (2, 3)], page_size=4, n_heads=4,
                                            n_kv=2, head_dim=24, max_seqs=3)
    ref = numpy_oracle(q, kp, vp, kvl, pi, cu, ns)
    kp, vp = np.array(kp), np.array(vp)
    used = {(pi[s, p // 4], p % 4) for s in range(int(ns)) for p in range(int(kvl[s]))}
    for page in range(kp.shape[0]):
        for off in range(4):
            if (page, off) not in used:
                kp[page, off] = np.nan
                vp[page, off] = np.inf
    # Stacked pools: the wanted layer is 1; the other layers are NaN.
    ks = np.full((3,) + kp.shape, np.nan, np.float32)
    vs = np.full((3,) + vp.shape, np.nan, np.float32)
    ks[1], vs[1] = kp, vp
    out = ragged_paged_attention_tpu(*(jnp.asarray(a) for a in (q, ks, vs, kvl, pi, cu, ns)),
                                     layer=jnp.int32(1), interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-5


# The smallest default scoped VMEM limit of the generations we lower for (v5e's 16 MiB; v6e and
# v7x allow more): a kernel under it fits every one.
SCOPED_VMEM = 16 << 20


@pytest.mark.parametrize("config", ["mistral-small-2409", "mistral-small-2501"])
def test_vmem_per_program_fits_every_generation_at_any_step_size(config):
    """The attention kernel holds one query block, not the step's tokens: its VMEM is the same at
    1 and 2,048 tokens and under the limit at every tp; the FP8 product's largest plan too."""
    from mistral_jax.config import ModelConfig
    from pallas_kernels.fp8_matmul.tpu import plan
    from pallas_kernels.fp8_matmul.tpu import vmem_bytes as fp8_vmem
    from pallas_kernels.ragged_paged_attention.tpu import vmem_bytes

    cfg = ModelConfig.named(config)
    for tp in (1, 2, 4, 8):
        heads, kv = cfg.n_heads // tp, cfg.n_kv_heads // tp
        assert vmem_bytes(heads, kv, cfg.head_dim, 16, jnp.bfloat16) < SCOPED_VMEM // 8, tp
        for m in (1, 256, 2048):
            for n, k in ((cfg.hidden_dim // tp, cfg.dim), (cfg.dim, cfg.hidden_dim // tp)):
                assert fp8_vmem(**plan(m, n, k)) < SCOPED_VMEM // 2, (tp, m, n, k)

