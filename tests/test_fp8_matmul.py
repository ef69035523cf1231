"""W8A8 FP8 matmul: the jnp reference against a float64 NumPy oracle, the Pallas kernels
(Triton and TPU, interpret mode on CPU) against the reference, the dispatcher, and (`pytest -m
gpu`, on the device) the compiled Triton kernel at Mistral-Small projection shapes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import (
    GPU_TRITON_MAX_M,
    default_impl,
    describe_impl,
    fp8_matmul,
    fp8_matmul_group,
    fp8_matmul_reference,
    quantize_input,
    quantize_rows,
    quantize_weight,
)
from pallas_kernels.fp8_matmul.tpu import fp8_matmul_tpu
from pallas_kernels.fp8_matmul.triton import fp8_matmul_group_triton, fp8_matmul_triton, plan

E4M3 = ml_dtypes.float8_e4m3fn
F32, BF16 = jnp.float32, jnp.bfloat16


def oracle_quantize(x):
    """Per-row dynamic quantization re-implemented in float64 with ml_dtypes: scale = amax / 448
    (1 for a zero row), x / scale saturated to +-448, rounded to nearest even into e4m3.
    Returns (x_q as float64, scale [m, 1] float64, the unrounded x / scale)."""
    xf = np.asarray(x, np.float64)
    amax = np.abs(xf).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 448.0, 1.0)
    t = np.clip(xf / scale, -448.0, 448.0)
    return t.astype(E4M3).astype(np.float64), scale, t


def assert_quantization_matches(x_q, x_scale, x):
    """quantize_rows' (x_q, x_scale) against the oracle. The f32 scale may differ from the
    float64 one by an ulp or two (XLA turns `/ 448` into `* (1/448)`); a wrong convention
    (e.g. amax / 240, or no saturation) is off by far more. An e4m3 code may then differ
    only for a value within a hair of a rounding midpoint, and by one step."""
    oq, oscale, t = oracle_quantize(x)
    np.testing.assert_allclose(np.asarray(x_scale, np.float64), oscale, rtol=3e-7, atol=0)
    q = np.asarray(x_q).astype(np.float64)
    diff = q != oq
    mid = (q + oq) / 2
    assert (np.abs(t - mid)[diff] <= 1e-6 * np.abs(t[diff])).all(), "x_q differs off a tie"
    assert diff.mean() < 1e-3
    return oq, oscale


def oracle(x, w, w_scale):
    """float64 y = (x_q @ w.T) * x_scale * w_scale."""
    x_q, x_scale, _ = oracle_quantize(x)
    w64 = np.asarray(w).astype(np.float64)
    return (x_q @ w64.T) * x_scale * np.asarray(w_scale, np.float64)[None, :]


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def make_inputs(rng, m, k, n, x_dtype=jnp.bfloat16):
    """Random x [m, k] (rows of different magnitudes) and a quantized random weight [n, k]."""
    x = rng.normal(size=(m, k)) * rng.uniform(0.1, 10.0, size=(m, 1))
    w, w_scale = quantize_weight(jnp.asarray(rng.normal(size=(n, k)) * 0.05, jnp.float32))
    return jnp.asarray(x, x_dtype), w, w_scale


# ------------------------------------------------------------------------------------------
# (a) the reference against the float64 oracle
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_oracle(x_dtype):
    rng = np.random.default_rng(0)
    m, k, n = 6, 200, 72
    x, w, w_scale = make_inputs(rng, m, k, n, jnp.float32)
    x = np.array(x)
    x[1] = 0.0                       # a row of zeros: scale 1, y row exactly 0
    x[2] *= 3e3                      # large values (still finite in bf16)
    x[3] = 1e-3 * rng.normal(size=k)  # small values
    x[4, 17] = -5e4                  # one outlier dominating its row's scale
    x = jnp.asarray(x, x_dtype)

    x_q, x_scale = quantize_rows(x)
    oq, _ = assert_quantization_matches(x_q, x_scale, np.asarray(x, np.float32))
    assert np.abs(oq).max(axis=1)[[0, 2, 3, 4, 5]].tolist() == [448.0] * 5  # amax hits 448
    assert x_scale[1, 0] == 1.0 and (np.asarray(x_q[1]).astype(np.float32) == 0).all()

    ref = oracle(np.asarray(x, np.float32), w, w_scale)
    out = fp8_matmul_reference(x, w, w_scale, out_dtype=jnp.float32)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert (np.asarray(out[1]) == 0).all()
    # Per-row relative error: rows differ by 1e7 in magnitude, so a norm over the whole
    # matrix would hide a wrong small row. f32 accumulation of k=200 exact products: ~1e-6.
    live = [0, 2, 3, 4, 5]
    for r in live:
        assert rel_err(out[r], ref[r]) < 1e-6, r
    out16 = fp8_matmul_reference(x, w, w_scale)  # bf16 out: one rounding of the f32 result
    assert out16.dtype == jnp.bfloat16
    for r in live:
        assert rel_err(out16[r], ref[r]) < 4e-3, r


def test_quantize_weight_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 40)).astype(np.float32) * np.array([[1e-3], [1], [10], [1e3], [0.5]],
                                                              np.float32)
    w_q, w_scale = quantize_weight(jnp.asarray(w))
    assert w_scale.shape == (5,) and w_q.dtype == jnp.float8_e4m3fn
    assert_quantization_matches(w_q, w_scale[:, None], w)


# ------------------------------------------------------------------------------------------
# (b) the Pallas kernels in interpret mode against the reference
# ------------------------------------------------------------------------------------------

def quantize_inputs(m, k, dtype, seed):
    """x [m, k] with rows of spread magnitudes, one zero row and one outlier (when m allows)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)) * rng.uniform(1e-3, 1e3, size=(m, 1))
    if m > 2:
        x[1] = 0.0
        x[2, k // 2] = 5e4
    return jnp.asarray(x, dtype)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("m,k,rows,x_dtype", [(1, 200, None, BF16), (7, 96, 16, F32), (129, 130, None, BF16),
                                              (3, 4096, 64, BF16), (5, 300, None, F32)])
def test_quantize_rows_triton_interpret(m, k, rows, x_dtype):
    # The Triton quantizer is quantize_rows (then pad_rows) bit for bit: same e4m3 codes, same
    # f32 scales, padding rows zero with scale 1; and quantize_rows matches the float64 oracle.
    from pallas_kernels.fp8_matmul import pad_rows
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, x_dtype, seed=m * k)
    x_q, x_scale = quantize_rows_triton(x, rows=rows, interpret=True)
    ref_q, ref_scale = pad_rows(*jax.jit(quantize_rows)(x), rows or m)
    assert x_q.dtype == jnp.float8_e4m3fn and x_scale.shape == ((rows or m), 1)
    assert same_bits(x_q, ref_q) and same_bits(x_scale, ref_scale)
    if x_dtype == F32:  # (bf16 inputs land on e4m3 ties too often for the oracle's tie allowance)
        assert_quantization_matches(x_q[:m], x_scale[:m], np.asarray(x, np.float32))


def fused_reference(x, fused, seed):
    """(the fused op's input, quantize_rows of the op's output): norm or gate drawn at random.
    The op and the quantization run as separate programs: in one, XLA may skip rounding the op's
    output to bf16 (excess precision), and the scales then differ by up to a bf16 ulp."""
    from pallas_kernels.activations import rms_norm, silu_mul

    rng = np.random.default_rng(seed)
    if fused == "norm":
        extra = dict(norm=jnp.asarray(rng.uniform(0.5, 2.0, size=x.shape[1]), x.dtype), eps=1e-5)
        h = jax.jit(rms_norm, static_argnums=2)(x, extra["norm"], extra["eps"])
    else:
        extra = dict(gate=jnp.asarray(rng.normal(size=x.shape) * 3, x.dtype))
        h = jax.jit(silu_mul)(extra["gate"], x)
    return extra, jax.jit(quantize_rows)(h)


def assert_close_codes(x_q, x_scale, ref_q, ref_scale, max_frac=0.05):
    """A fused op's output may differ from the reference's by a bf16 ulp: its f32 sums add in
    another order, and XLA may skip rounding to bf16 between ops (excess precision), in the
    reference or in interpret mode. So scales within a bf16 ulp (up to 2^-7), and e4m3 codes equal
    but for a few one-step differences (a 2^-8 shift flips ~3% of codes at most)."""
    np.testing.assert_allclose(np.asarray(x_scale), np.asarray(ref_scale), rtol=2.0 ** -7)
    a, b = np.asarray(x_q).astype(np.float32), np.asarray(ref_q).astype(np.float32)
    diff = a != b
    assert diff.mean() <= max_frac, diff.mean()
    step = np.abs(a - b)[diff] / np.maximum(np.abs(b[diff]), 2.0 ** -6)  # one e4m3 step is <= 1/8 relative
    assert (step <= 0.25).all(), step.max()


@pytest.mark.parametrize("m,k,fused", [(1, 200, "norm"), (7, 130, "gate"), (3, 4096, "norm"), (5, 96, "gate")])
def test_quantize_rows_triton_fused_interpret(m, k, fused):
    # norm= and gate= fold the op that produces x into the quantizer: against quantize_input's
    # jnp twin (rms_norm or silu_mul, then quantize_rows).
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, BF16, seed=k)
    extra, (ref_q, ref_scale) = fused_reference(x, fused, seed=m)
    x_q, x_scale = quantize_rows_triton(x, interpret=True, **extra)
    assert_close_codes(x_q, x_scale, ref_q, ref_scale)
    # quantize_input routes an interpreted Triton impl here too
    q2, s2 = quantize_input(x, impl="triton", interpret=True, **extra)
    assert same_bits(q2, x_q) and same_bits(s2, x_scale)


@pytest.mark.parametrize("m,k", [(1, 200), (5, 130)])
def test_quantize_rows_triton_stacked_norm_interpret(m, k):
    # A model's norms are one stack [layers, k]: with layer=, the kernel reads that layer's row in
    # place; the same bits as handing it the row, and as the jnp twin given the stack and layer.
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, BF16, seed=k + 1)
    norms = jnp.asarray(np.random.default_rng(m).uniform(0.5, 2.0, size=(4, k)), BF16)
    for layer in (0, 3):
        q, s = quantize_rows_triton(x, norm=norms, eps=1e-5, layer=jnp.int32(layer), interpret=True)
        q_row, s_row = quantize_rows_triton(x, norm=norms[layer], eps=1e-5, interpret=True)
        assert same_bits(q, q_row) and same_bits(s, s_row)
        ref_q, ref_s = quantize_input(x, norm=norms, eps=1e-5, layer=jnp.int32(layer), impl="xla")
        assert_close_codes(q, s, ref_q, ref_s)
    with pytest.raises(ValueError, match="wants norm"):
        quantize_rows_triton(x, norm=norms[0], layer=jnp.int32(0), interpret=True)  # a row where a stack is due


@pytest.mark.parametrize("m,k,fused", [(1, 5120, None), (7, 5120, "norm"), (64, 32768, "gate"), (1, 5120, "stacked")])
def test_quantize_rows_triton_lowers_for_cuda(m, k, fused):
    # Interpret mode runs the kernel's jnp in XLA, which takes what Triton may not (a bf16
    # division did not lower): lowering it for CUDA here catches that in CI.
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = jax.ShapeDtypeStruct((m, k), BF16)
    extra = {"norm": dict(norm=jax.ShapeDtypeStruct((k,), BF16)), "gate": dict(gate=x), None: {},
             "stacked": dict(norm=jax.ShapeDtypeStruct((40, k), BF16),
                             layer=jax.ShapeDtypeStruct((), jnp.int32))}[fused]
    fn = jax.jit(lambda x, extra: quantize_rows_triton(x, eps=1e-5, **extra))
    text = fn.trace(x, extra).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_quantize_rows_triton_errors():
    from pallas_kernels.fp8_matmul.quantize_rows_triton import MAX_K, quantize_rows_triton

    with pytest.raises(ValueError, match="over 32768"):
        quantize_rows_triton(jnp.ones((1, MAX_K + 1), BF16), interpret=True)
    with pytest.raises(ValueError, match="fewer than"):
        quantize_rows_triton(jnp.ones((4, 8), BF16), rows=2, interpret=True)
    with pytest.raises(ValueError, match="not both"):
        quantize_rows_triton(jnp.ones((4, 8), BF16), norm=jnp.ones((8,), BF16), gate=jnp.ones((4, 8), BF16))
    with pytest.raises(ValueError, match="wants norm"):
        quantize_rows_triton(jnp.ones((4, 8), BF16), norm=jnp.ones((4,), BF16))

# Every m of {1, 7, 129} with both ragged (k, n) (k, n not multiples of any block), and every
# (x dtype, out dtype) pair at least once; one interpret-mode compilation per case (~3 s).
CASES = [
    (1, 200, 72, BF16, BF16), (1, 96, 130, F32, F32),
    (7, 200, 72, F32, BF16), (7, 96, 130, BF16, F32),
    (129, 200, 72, BF16, F32), (129, 96, 130, F32, BF16),
]
# Kernel and reference quantize identically and multiply exact e4m3 products, so they differ
# only by f32 summation order (~k * 2^-24 relative at worst): 1e-5 for f32 out. bf16 out: a
# half-ulp difference can flip a rounding of an element (2^-8 relative), so 1e-2.
TOL = {F32: 1e-5, BF16: 1e-2}


def check_kernel(kernel, m, k, n, x_dtype, out_dtype, seed, **kw):
    rng = np.random.default_rng(seed)
    x, w, w_scale = make_inputs(rng, m, k, n, x_dtype)
    out = kernel(x, w, w_scale, out_dtype=out_dtype, interpret=True, **kw)
    ref = np.asarray(fp8_matmul_reference(x, w, w_scale, out_dtype=out_dtype), np.float64)
    assert out.shape == (m, n) and out.dtype == out_dtype
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    assert (o != 0).all()  # random inputs: an all-zero / unwritten element would show
    err = np.abs(o - ref).max(axis=1) / np.abs(ref).max(axis=1)  # per row, every element
    assert err.max() < TOL[out_dtype], err.max()
    return out


@pytest.mark.parametrize("m,k,n,x_dtype,out_dtype", CASES)
def test_triton_interpret(m, k, n, x_dtype, out_dtype):
    check_kernel(fp8_matmul_triton, m, k, n, x_dtype, out_dtype, seed=m + k)


def test_triton_interpret_split_k_small_blocks():
    # Split-K with an uneven split (7 K blocks of 32 in 3 splits, the tail block ragged) and
    # n tiles of 16 with a ragged last tile.
    cfg = plan(3, 72, 200, block_n=16, block_k=32, split_k=3)
    assert cfg["split_k"] == 3 and cfg["block_k"] == 32
    check_kernel(fp8_matmul_triton, 3, 200, 72, BF16, F32, seed=5, block_n=16, block_k=32,
                 split_k=3)


@pytest.mark.parametrize("m,k,n,x_dtype,out_dtype", CASES)
def test_tpu_interpret(m, k, n, x_dtype, out_dtype):
    # The smallest legal blocks, so these shapes span several m, n and k blocks (k=200: two,
    # the second half padding): the accumulator carries across k and is reset per (m, n)
    # block. The default plan (one block here) runs in test_dispatch.
    check_kernel(fp8_matmul_tpu, m, k, n, x_dtype, out_dtype, seed=m + n, bm=32, bn=128, bk=128)


@pytest.mark.parametrize("impl,kw", [("triton", dict(block_n=16, block_k=32, split_k=2)),
                                     ("triton", dict(block_n=16, block_k=32, split_k=1)),
                                     ("tpu", {}), ("reference", {}), ("xla", {})])
def test_stacked_weights_read_the_asked_layer(impl, kw):
    # A model's stacked [layers, n, k] weights with a traced layer index (as inside its layer
    # scan): every layer's product equals the plain one on that layer's weight. Ragged n, k and
    # a layer past the first make a wrong row offset (layer * n) or a stale layer show. The
    # Triton kernel reads the scales' stack too (split_k=1; with a split XLA applies them).
    rng = np.random.default_rng(11)
    m, k, n, layers = 5, 96, 40, 3
    x = jnp.asarray(rng.normal(size=(m, k)), BF16)
    ws, ss = zip(*(quantize_weight(jnp.asarray(rng.normal(size=(n, k)) * 0.05, F32)) for _ in range(layers)))
    w, w_scale = jnp.stack(ws), jnp.stack(ss)  # [layers, n, k], [layers, n]
    if impl == "triton":
        run = jax.jit(lambda x, w, s, layer: fp8_matmul_triton(x, w, s, layer=layer, out_dtype=F32, interpret=True,
                                                               **kw))
    elif impl == "tpu":
        run = jax.jit(lambda x, w, s, layer: fp8_matmul_tpu(x, w, s, layer=layer, out_dtype=F32, interpret=True))
    else:
        run = jax.jit(lambda x, w, s, layer: fp8_matmul(x, w, s, layer=layer, impl=impl, out_dtype=F32))
    for layer in (2, 0, 1):
        out = run(x, w, w_scale, jnp.int32(layer))
        ref = np.asarray(fp8_matmul_reference(x, ws[layer], ss[layer], out_dtype=F32), np.float64)
        assert rel_err(out, ref) < 1e-5, (impl, layer)
    with pytest.raises(ValueError, match="layer"):
        fp8_matmul(x, w, w_scale, impl=impl if impl != "triton" else "reference")


@pytest.mark.parametrize("m,ns,stacked,kw", [
    (1, (64, 16, 16), False, dict(block_n=16, block_k=32)),  # q, k, v shaped; split-K by plan
    (5, (40, 23, 70), True, dict(block_n=16, block_k=32, split_k=3)),  # every n ragged, stacked
    (33, (48, 48), True, dict(block_n=16, block_k=32, split_k=1)),  # w1, w3 shaped, no split
])
def test_triton_group_one_launch(m, ns, stacked, kw):
    # Several weights of one x in one launch (the grid's n tiles run through them in turn):
    # each y equals its own reference product, at ragged n (a group's last tile is partial and
    # the next group's tiles start after it) and k (= 200: a ragged tail block).
    rng = np.random.default_rng(m)
    k, layers = 200, 3
    x = jnp.asarray(rng.normal(size=(m, k)), BF16)
    qs = [[quantize_weight(jnp.asarray(rng.normal(size=(n, k)) * 0.05, F32)) for _ in range(layers)] for n in ns]
    ws = [jnp.stack([w for w, _ in q]) if stacked else q[0][0] for q in qs]
    ss = [jnp.stack([s for _, s in q]) if stacked else q[0][1] for q in qs]
    layer = 2 if stacked else 0
    at = dict(layer=jnp.int32(layer) if stacked else None, out_dtype=F32)
    outs = fp8_matmul_group_triton(x, ws, ss, interpret=True, **at, **kw)
    assert len(outs) == len(ns)
    for out, q, n in zip(outs, qs, ns):
        ref = np.asarray(fp8_matmul_reference(x, *q[layer], out_dtype=F32), np.float64)
        assert out.shape == (m, n) and (np.asarray(out) != 0).all()
        assert rel_err(out, ref) < 1e-5, n
    # The dispatcher: its default plan in one launch, and the twins one product per weight.
    for impl in ("triton", "reference", "xla"):
        for out, other in zip(outs, fp8_matmul_group(x, ws, ss, impl=impl, interpret=True, **at)):
            assert rel_err(other, out) < 1e-5, impl


def test_triton_offsets_overflow_rule():
    # Pallas's Triton lowering: i32 offsets for arrays of at most 2**32 bytes, sign-extended by
    # addptr. 1-byte arrays between 2 and 4 GiB overflow; wider dtypes and larger arrays do not.
    from pallas_kernels.gpu_info import triton_offsets_overflow

    fp8 = jnp.float8_e4m3fn
    assert triton_offsets_overflow((40, 16384, 5120), fp8)  # 2501's w1/w3 per GPU at tp=2 (3.36 GB)
    assert triton_offsets_overflow((40, 5120, 16384), fp8)  # its w2
    assert triton_offsets_overflow((56, 8192, 6144), fp8)  # 2409's w1/w3 at tp=2 (2.8 GB)
    assert not triton_offsets_overflow((40, 32768, 5120), fp8)  # tp=1: over 4 GiB, 64-bit offsets
    assert not triton_offsets_overflow((56, 6144, 6144), fp8)  # 2409's wq, 2.11 GB: just under 2**31
    assert not triton_offsets_overflow((2**31,), fp8) and triton_offsets_overflow((2**31 + 1,), jnp.int8)
    assert not triton_offsets_overflow((40, 16384, 5120), BF16)  # <= 2**31 elements in 4 GiB


@pytest.mark.parametrize("m,k,n,layers,kw", [
    (1, 96, 40, 3, dict(block_n=16, block_k=32, split_k=2)),  # odd layers, the last one, split-K
    (5, 200, 70, 5, dict(block_n=16, block_k=64, split_k=1)),  # ragged k tail (200 = 3 * 64 + 8), ragged n
    (33, 160, 48, 1, {}),  # the default plan, non-power-of-two widths
])
def test_triton_byte_pairs_read_the_asked_layer(m, k, n, layers, kw):
    # The path a 2-4 GiB stack takes (pairs=True forces it at small shapes): w as uint16 pairs,
    # split back into e4m3 bytes in the kernel. Every layer of an odd stack, ragged n and k:
    # a wrong pair order, stride or row offset gives O(1) errors.
    rng = np.random.default_rng(m + k)
    x = jnp.asarray(rng.normal(size=(m, k)), BF16)
    ws, ss = zip(*(quantize_weight(jnp.asarray(rng.normal(size=(n, k)) * 0.05, F32)) for _ in range(layers)))
    w, w_scale = jnp.stack(ws), jnp.stack(ss)
    run = jax.jit(lambda x, w, s, layer: fp8_matmul_triton(x, w, s, layer=layer, out_dtype=F32, interpret=True,
                                                           pairs=True, **kw))
    for layer in range(layers)[::-1]:
        ref = np.asarray(fp8_matmul_reference(x, ws[layer], ss[layer], out_dtype=F32), np.float64)
        assert rel_err(run(x, w, w_scale, jnp.int32(layer)), ref) < 1e-5, layer
    with pytest.raises(ValueError, match="even k"):
        fp8_matmul_triton(x[:, :-1], w[:, :, :-1], w_scale, layer=0, pairs=True, interpret=True)


def test_triton_kernel_lowers_2_to_4_gib_stacks_as_pairs():
    # At the real shapes, for CUDA: a 3.36 GB stack (2501's w1 per GPU at tp=2) reaches the
    # kernel as uint16 pairs, bitcast in XLA (no copy); a 6.7 GB one (tp=1) as plain e4m3.
    def lowered(layers, n, k):
        args = (jax.ShapeDtypeStruct((1, k), BF16), jax.ShapeDtypeStruct((layers, n, k), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((layers, n), F32), jax.ShapeDtypeStruct((), jnp.int32))
        fn = jax.jit(lambda x, w, s, layer: fp8_matmul_triton(x, w, s, layer=layer))
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    text = lowered(40, 16384, 5120)
    assert "tensor<655360x2560xui16>" in text and "stablehlo.copy" not in text
    assert "ui16" not in lowered(40, 32768, 5120)


@pytest.mark.parametrize("m,k,block", [(1, 2500, 64), (5, 1024, 100), (3, 4096, 4096), (2, 70, 16)])
def test_quantize_rows_triton_block_amax_interpret(m, k, block):
    # x quantized with its rows' maxima given per block (by the kernel that produced x): the
    # same codes and scales as quantize_rows' one program per row, at ragged k and block counts
    # that are no power of two; a zero row still gets scale 1.
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, BF16, seed=k + m)
    if m > 1:
        x = x.at[m - 1].set(0)
    xa = np.abs(np.asarray(x, np.float32))
    blocks = np.stack([xa[:, i:i + block].max(axis=1) for i in range(0, k, block)], axis=1)  # [m, nb]
    q, scale = quantize_rows_triton(x, block_amax=jnp.asarray(blocks), interpret=True)
    want_q, want_scale = quantize_rows_triton(x, interpret=True)
    assert same_bits(q, want_q) and same_bits(scale, want_scale)
    with pytest.raises(ValueError, match="block_amax"):
        quantize_rows_triton(x, block_amax=jnp.asarray(blocks[:, :, None]), interpret=True)


@pytest.mark.parametrize("m,n,k,stacked,kw", [
    (1, 70, 200, True, dict(block_n=16, block_k=32)),  # ragged n and k, a stack's last layer
    (5, 48, 96, False, dict(block_n=16, block_k=32)),
    (17, 40, 128, True, dict(block_n=32, block_k=64)),  # two row tiles' worth of 16
])
def test_triton_swiglu_interpret(m, n, k, stacked, kw):
    # w1 and w3 in one launch with silu_mul in the epilogue, then the quantizer spread over each
    # row: the same bits as the Triton products (same tiles) followed by the gate-fused quantizer,
    # and close to the jnp twin (its products sum in another order).
    from pallas_kernels.fp8_matmul import fp8_swiglu
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton
    from pallas_kernels.fp8_matmul.triton import fp8_swiglu_triton

    rng = np.random.default_rng(m + n)
    layers = 3 if stacked else 1
    x = jnp.asarray(rng.normal(size=(m, k)) * rng.uniform(0.1, 10.0, size=(m, 1)), BF16)
    pairs = [quantize_weight(jnp.asarray(rng.normal(size=(layers * n, k)) * 0.1, F32)) for _ in range(2)]
    (w1, s1), (w3, s3) = [(w.reshape(layers, n, k), sc.reshape(layers, n)) for w, sc in pairs]
    at = dict(layer=jnp.int32(layers - 1)) if stacked else {}
    if not stacked:
        w1, s1, w3, s3 = w1[0], s1[0], w3[0], s3[0]
    q, scale = fp8_swiglu_triton(x, w1, w3, s1, s3, interpret=True, **kw, **at)
    gate, up = fp8_matmul_group_triton(x, (w1, w3), (s1, s3), interpret=True, split_k=1, **kw, **at)
    want_q, want_scale = quantize_rows_triton(up, gate=gate, interpret=True)
    assert q.shape == (m, n) and same_bits(q, want_q) and same_bits(scale, want_scale)
    ref_q, ref_scale = fp8_swiglu(x, w1, w3, s1, s3, impl="reference", **at)
    assert_close_codes(q, scale, ref_q, ref_scale)
    # Where the plan splits K (few n tiles), the kernel declines and the dispatcher takes the
    # products and the fused quantizer.
    assert fp8_swiglu_triton(x, w1, w3, s1, s3, interpret=True, split_k=2, **{**kw, "block_k": 32}, **at) is None
    q2, s2 = fp8_swiglu(x, w1, w3, s1, s3, impl="triton", interpret=True, **at)
    assert_close_codes(q2, s2, ref_q, ref_scale)


def test_triton_swiglu_lowers_for_cuda():
    # Both launches lower for CUDA at Mistral-Small-2501's w1/w3 stack (CI has no GPU).
    from pallas_kernels.fp8_matmul.triton import fp8_swiglu_triton

    w = jax.ShapeDtypeStruct((40, 32768, 5120), jnp.float8_e4m3fn)
    sc = jax.ShapeDtypeStruct((40, 32768), F32)
    for m in (1, 16, 32):
        fn = jax.jit(lambda x, w1, w3, s1, s3, layer: fp8_swiglu_triton(x, w1, w3, s1, s3, layer=layer))
        text = fn.trace(jax.ShapeDtypeStruct((m, 5120), BF16), w, w, sc, sc,
                        jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3, m  # x's quantizer, the products, h's quantizer


@pytest.mark.parametrize("impl", ["reference", "xla", "triton", "tpu"])
def test_prequantized_x(impl):
    # x quantized by the caller (as tp shards do with a shared row max) with its scales: the
    # same product as quantizing inside; a 16-bit x or a wrong scale shape is refused.
    rng = np.random.default_rng(12)
    x, w, w_scale = make_inputs(rng, 7, 96, 130)
    x_q, x_scale = quantize_rows(x)
    want = np.asarray(fp8_matmul_reference(x, w, w_scale, out_dtype=F32), np.float64)
    got = fp8_matmul(x_q, w, w_scale, x_scale=x_scale, impl=impl, out_dtype=F32, interpret=True)
    assert rel_err(got, want) < 1e-6
    with pytest.raises(ValueError, match="pre-quantized"):
        fp8_matmul(x, w, w_scale, x_scale=x_scale, impl=impl, interpret=True)
    with pytest.raises(ValueError, match="pre-quantized"):
        fp8_matmul(x_q, w, w_scale, x_scale=x_scale[:, 0], impl=impl, interpret=True)


def test_plan_regimes():
    dec = plan(1, 1024, 5120, sms=132)
    assert dec["block_m"] == 16 and dec["split_k"] > 1
    # decode products that need split-K take 32-wide n tiles; a wide one (w1 + w3) keeps 64
    assert plan(1, 5120, 32768, sms=132)["block_n"] == plan(16, 6144, 5120, sms=132)["block_n"] == 32
    assert plan(1, 65536, 5120, sms=132)["block_n"] == 64 and plan(1, 65536, 5120, sms=132)["split_k"] == 1
    pre = plan(4096, 6144, 5120, sms=132)
    assert (pre["block_m"], pre["block_n"], pre["block_k"], pre["split_k"]) == (128, 128, 128, 1)
    # 17-32 rows of a wide product (w1 + w3 of 2501: 1,024 n tiles) take narrower K blocks and
    # one more stage; a product that needs split-K (w2) keeps the 64 x 256 blocks.
    wide = plan(32, 65536, 5120, sms=132)
    assert (wide["block_n"], wide["block_k"], wide["num_stages"], wide["split_k"]) == (128, 128, 5, 1)
    narrow = plan(32, 5120, 32768, sms=132)
    assert (narrow["block_n"], narrow["block_k"], narrow["num_stages"]) == (64, 256, 4) and narrow["split_k"] > 1
    tiny = plan(1, 8, 10)
    assert tiny["block_k"] >= 32 and tiny["block_n"] >= 16 and tiny["split_k"] == 1


# ------------------------------------------------------------------------------------------
# (c) the dispatcher
# ------------------------------------------------------------------------------------------

def test_dispatch():
    # The shape and dtypes of a CASES entry: the kernels' compilations are reused.
    rng = np.random.default_rng(7)
    x, w, w_scale = make_inputs(rng, 7, 96, 130)
    ref = np.asarray(fp8_matmul(x, w, w_scale, impl="reference", out_dtype=F32), np.float64)
    for impl in ("auto", "xla"):  # auto is XLA on CPU; XLA's fp8 dot is the twin
        assert rel_err(fp8_matmul(x, w, w_scale, impl=impl, out_dtype=F32), ref) < 1e-5
    for impl in ("triton", "tpu"):
        out = fp8_matmul(x, w, w_scale, impl=impl, out_dtype=F32, interpret=True)
        assert out.dtype == F32 and rel_err(out, ref) < 1e-5
    assert fp8_matmul(x, w, w_scale, impl="reference").dtype == BF16  # default out_dtype


def test_default_impl_by_backend_and_rows():
    # GPU: the Triton kernel for decode-sized m, the Mosaic GPU kernel above, or XLA's fp8 dot
    # (cuBLASLt) where n or k does not fit its tiles.
    assert default_impl("gpu", 1) == default_impl("gpu", GPU_TRITON_MAX_M) == "triton"
    assert default_impl("gpu", GPU_TRITON_MAX_M + 1) == default_impl("gpu", 4096, 32768, 5120) == "mgpu"
    assert default_impl("gpu", 4096, 1000, 5120) == default_impl("gpu", 4096, 1024, 5000) == "xla"
    assert default_impl("tpu", 1) == default_impl("tpu", 4096) == "tpu"
    assert default_impl("cpu", 1) == "xla"
    assert describe_impl("auto", "gpu").startswith(f"triton up to {GPU_TRITON_MAX_M} tokens")
    assert describe_impl("auto", "cpu") == "xla" and describe_impl("reference", "gpu") == "reference"


def test_dispatch_errors():
    rng = np.random.default_rng(8)
    x, w, w_scale = make_inputs(rng, 2, 64, 48)
    with pytest.raises(ValueError, match="impl"):
        fp8_matmul(x, w, w_scale, impl="cuda")
    for impl in ("reference", "triton", "tpu"):
        with pytest.raises(ValueError, match="shapes"):
            fp8_matmul(x[:, :32], w, w_scale, impl=impl, interpret=True)
        with pytest.raises(ValueError, match="shapes"):
            fp8_matmul(x, w, w_scale[:5], impl=impl, interpret=True)


def test_mgpu_split_k_choice():
    # The cost model splits K only where the output tiles leave SMs idle: 2501's w2 at 512
    # rows (160 tiles on 132 SMs), not its w1 (512 tiles) nor anything at 4096 rows.
    from pallas_kernels.fp8_matmul.mgpu import choose_split_k

    assert choose_split_k(512, 5120, 32768) == 4
    assert choose_split_k(512, 32768, 5120) == choose_split_k(4096, 5120, 32768) == 1
    assert choose_split_k(4096, 32768, 5120) == choose_split_k(512, 4096, 5120) == 1
    assert choose_split_k(128, 128, 256) == 1  # 2 K steps: nothing to split


def test_mgpu_tile_choice():
    # 33-64 rows: 64-row tiles; prefill: three warpgroups (192-row tiles) where padding m to 192
    # rows costs <= 5% more rows than to 128; the 128 x 128 default otherwise.
    from pallas_kernels.fp8_matmul.mgpu import DECODE_TILES, PREFILL_TILES, Tiles, choose_tiles

    assert choose_tiles(64, 5120, 32768) == choose_tiles(33, 1024, 5120) == DECODE_TILES
    assert DECODE_TILES.cta_m == 64 and PREFILL_TILES.cta_m == 192
    assert choose_tiles(4096, 32768, 5120) == choose_tiles(3000, 5120, 4096) == PREFILL_TILES  # 4224, 3072 rows
    assert choose_tiles(512, 5120, 32768) == choose_tiles(1000, 4096, 5120) == Tiles()  # 576 vs 512; 1152 vs 1024
    assert choose_tiles(64, 128, 256) == Tiles()  # n too narrow for a 256-wide tile


@pytest.mark.parametrize("m,n,k,layers", [(4096, 32768, 5120, 40), (300, 5120, 32768, 1), (512, 5120, 32768, 2),
                                          (64, 4096, 5120, 2)])
def test_mgpu_kernel_lowers_for_cuda(m, n, k, layers):
    # The Mosaic GPU kernel has no CPU interpret mode (JAX 0.10's interpreter takes no transposed
    # wgmma operand); lowering it for CUDA here runs its tracing and layout inference, so a broken
    # kernel fails in CI, not first on the device. Shared-memory size is checked only there
    # (TestMosaicGPU runs it).
    from pallas_kernels.fp8_matmul.mgpu import fp8_matmul_mgpu

    args = (jax.ShapeDtypeStruct((m, k), BF16), jax.ShapeDtypeStruct((layers, n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((layers, n), F32), jax.ShapeDtypeStruct((), jnp.int32))
    fn = jax.jit(lambda x, w, s, layer: fp8_matmul_mgpu(x, w, s, layer=layer))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # One Mosaic GPU custom call whose module issues fp8 x fp8 -> f32 wgmma (not an upcast).
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text
    with pytest.raises(ValueError, match="multiple of"):
        fp8_matmul_mgpu(jnp.zeros((8, 5120), BF16), jnp.zeros((1000, 5120), jnp.float8_e4m3fn), jnp.ones((1000,), F32))


# ------------------------------------------------------------------------------------------
# (d) GPU (run on the device: python -m pytest -q -m gpu tests/test_fp8_matmul.py)
# ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
class TestGPU:
    @staticmethod
    def _check(m, k, n, out_dtype, tol, **tuning):
        rng = np.random.default_rng(m)
        x, w, w_scale = make_inputs(rng, m, k, n)
        out = fp8_matmul_triton(x, w, w_scale, out_dtype=out_dtype, **tuning)
        ref = np.asarray(fp8_matmul_reference(x, w, w_scale, out_dtype=F32), np.float64)
        o = np.asarray(out, np.float64)
        assert out.shape == (m, n) and np.isfinite(o).all()
        err = np.abs(o - ref).max() / np.abs(ref).max()
        assert err < tol, err

    # The GPU reference runs its f32 dot at HIGHEST precision; e4m3 products are exact, so
    # only the summation order over k=5120 differs (f32: 1e-5 of the largest element).
    @pytest.mark.parametrize("m", [1, 64, 4096])
    @pytest.mark.parametrize("out_dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
    def test_mistral_small_projection(self, m, out_dtype, tol):
        self._check(m, 5120, 6144, out_dtype, tol)

    @pytest.mark.parametrize("m,k,n", [(1, 200, 72), (7, 96, 130), (300, 5120, 1000),
                                       (33, 4096, 5120)])
    def test_ragged_and_split(self, m, k, n):
        self._check(m, k, n, F32, 1e-5)
        self._check(m, k, n, F32, 1e-5, split_k=1)

    @pytest.mark.parametrize("m", [1, 64])
    def test_group_qkv(self, m):
        # Mistral-Small-2501's q, k, v (4096, 1024, 1024 rows of 5120) in one launch.
        rng = np.random.default_rng(m)
        x, *_ = make_inputs(rng, m, 5120, 8)
        ws = [quantize_weight(jnp.asarray(rng.normal(size=(n, 5120)) * 0.05, F32)) for n in (4096, 1024, 1024)]
        outs = fp8_matmul_group_triton(x, [w for w, _ in ws], [s for _, s in ws], out_dtype=F32)
        for out, (w, s) in zip(outs, ws):
            ref = np.asarray(fp8_matmul_reference(x, w, s, out_dtype=F32), np.float64)
            assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() < 1e-5

    @pytest.mark.parametrize("layers,n,k", [(2, 458752, 5120), (40, 32768, 5120)])
    def test_stack_past_4_gib(self, layers, n, k):
        # Stacks over 4 GiB: Triton lowering switches to 64-bit offsets, and the last layer's
        # rows start past int32 elements. [2, 458752, 5120] is 4.7 GB; [40, 32768, 5120] is
        # Mistral-Small-2501's w1 stack (6.7 GB). (k stays at 5120: with these weights' spread of
        # exponents, Hopper's fp8 accumulation drifts past 1e-5 at k = 69632.) The last layer against
        # the plain product on that layer alone; on failure, also against layer 0 (were the wrong
        # rows read?).
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.normal(size=(3, k)), BF16)
        # Drawn 1024 rows at a time: random bits come as u32 first, 4x the stack in one draw.
        def draw(key):
            bits = jax.random.bits(key, (1024, k), jnp.uint8)
            return jax.lax.bitcast_convert_type(bits & 0xF7, jnp.float8_e4m3fn)  # exponent <= 14: |w| <= 240
        keys = jax.random.split(jax.random.key(0), layers * n // 1024)
        w = jax.jit(lambda keys: jax.lax.map(draw, keys).reshape(layers, n, k))(keys)
        w_scale = jnp.asarray(rng.uniform(0.5, 2.0, size=(layers, n)), F32)
        out = np.asarray(fp8_matmul_triton(x, w, w_scale, layer=jnp.int32(layers - 1), out_dtype=F32), np.float64)

        def err_against(layer):
            ref = np.asarray(fp8_matmul_reference(x, w[layer], w_scale[layer], out_dtype=F32), np.float64)
            return np.abs(out - ref).max() / np.abs(ref).max()

        err = err_against(layers - 1)
        assert err < 1e-5, f"relative error {err:.3g} against layer {layers - 1}, {err_against(0):.3g} against layer 0"


def ieee_quantize(x):
    """quantize_rows with every f32 step correctly rounded, in NumPy: the scale amax * RN(1/448),
    the quotient x / scale as float64 rounded once to f32 (exact for a division of f32 values),
    then saturation and ml_dtypes' round-to-nearest-even e4m3."""
    xf = np.asarray(x, np.float32)
    amax = np.abs(xf).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1.0 / 448.0), np.float32(1.0)).astype(np.float32)
    t = (xf.astype(np.float64) / scale.astype(np.float64)).astype(np.float32)
    return np.clip(t, -448.0, 448.0).astype(E4M3), scale


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
@pytest.mark.parametrize("m,k,rows", [(1, 5120, None), (7, 4096, 16), (64, 32768, None), (40, 5120, 64),
                                      (4096, 5120, None)])
def test_quantize_rows_triton_gpu(m, k, rows):
    # On the GPU the quantizer divides by Markstein's correction (Triton's `/` is approximate):
    # every e4m3 code and scale as IEEE f32 arithmetic gives them, at the model's widths.
    # (XLA's own quantize_rows on the GPU was seen 2 codes in 21 million off that.)
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, BF16, seed=m + k)
    x_q, x_scale = quantize_rows_triton(x, rows=rows)
    want_q, want_scale = ieee_quantize(np.asarray(x, np.float32))
    rows = rows or m
    assert same_bits(x_scale[:m], want_scale) and (np.asarray(x_scale[m:]) == 1).all()
    codes = np.asarray(x_q[:m]).view(np.uint8) != want_q.view(np.uint8)
    assert not codes.any(), f"{codes.sum()} of {codes.size} e4m3 codes differ"
    assert not np.asarray(x_q[m:]).view(np.uint8).any()
    xla_q, _ = jax.jit(quantize_rows)(x)
    print(f"XLA's quantize_rows: {(np.asarray(xla_q).view(np.uint8) != want_q.view(np.uint8)).sum()} codes off")


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
@pytest.mark.parametrize("m,k,fused", [(1, 5120, "norm"), (64, 5120, "norm"), (1, 32768, "gate"),
                                       (300, 32768, "gate"), (4096, 6144, "norm")])
def test_quantize_rows_triton_fused_gpu(m, k, fused):
    # The fused RMSNorm and silu(gate) * up against XLA running their jnp code, then quantize_rows
    # (seen failing when both ran in one XLA program: it kept silu's output in f32).
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton

    x = quantize_inputs(m, k, BF16, seed=k)
    extra, (ref_q, ref_scale) = fused_reference(x, fused, seed=m)
    x_q, x_scale = quantize_rows_triton(x, **extra)
    assert_close_codes(x_q, x_scale, ref_q, ref_scale)


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
@pytest.mark.parametrize("m", [1, 16, 32])
def test_triton_swiglu_gpu(m):
    # Compiled, at 2501's w1/w3 shape (a 2-layer stack, its last layer): the same bits as the
    # Triton products (same tiles, no split) followed by the gate-fused quantizer, and close to
    # the jnp twin.
    from pallas_kernels.fp8_matmul import fp8_swiglu
    from pallas_kernels.fp8_matmul.quantize_rows_triton import quantize_rows_triton
    from pallas_kernels.fp8_matmul.triton import fp8_swiglu_triton

    rng = np.random.default_rng(m)
    n, k, layers = 32768, 5120, 2
    x = jnp.asarray(rng.normal(size=(m, k)) * rng.uniform(0.1, 10.0, size=(m, 1)), BF16)
    ws = [quantize_weight(jax.random.normal(jax.random.key(i), (layers * n, k), F32) * 0.02) for i in range(2)]
    (w1, s1), (w3, s3) = [(w.reshape(layers, n, k), sc.reshape(layers, n)) for w, sc in ws]
    layer = jnp.int32(layers - 1)
    q, scale = fp8_swiglu_triton(x, w1, w3, s1, s3, layer=layer)
    cfg = plan(m, 2 * n, k)
    cfg.pop("split_k")
    gate, up = fp8_matmul_group_triton(x, (w1, w3), (s1, s3), layer=layer, split_k=1, **cfg)
    want_q, want_scale = quantize_rows_triton(up, gate=gate)
    assert same_bits(scale, want_scale)
    codes = np.asarray(q).view(np.uint8) != np.asarray(want_q).view(np.uint8)
    assert not codes.any(), f"{codes.sum()} of {codes.size} codes differ"
    ref_q, ref_scale = fp8_swiglu(x, w1, w3, s1, s3, layer=layer, impl="reference")
    assert_close_codes(q, scale, ref_q, ref_scale)


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu_only")
class TestMosaicGPU:
    """The wgmma kernel (prefill) against the reference, compiled on the GPU."""

    # split_k None: choose_split_k's pick (1 for most; 4 for 2501's w2 at 512 rows, 8 for
    # [512, 32768] @ [32768, 512]); 2: the partials' path on a stack's last layer.
    # Tiles as choose_tiles picks them: 64-row tiles at 33-64 rows (40: ragged), 192-row tiles at
    # 4096 and 3000 (ragged) rows, 128-row tiles otherwise.
    @pytest.mark.parametrize("m,k,n,layers,split_k", [
        (128, 128, 256, 1, None), (4096, 5120, 1024, 3, None), (4096, 5120, 1024, 3, 2), (300, 5120, 4096, 1, None),
        (129, 4096, 5120, 2, None), (512, 32768, 512, 1, None), (512, 32768, 5120, 1, None),
        (64, 32768, 5120, 2, None), (40, 5120, 1024, 1, None), (3000, 4096, 5120, 1, None)])
    def test_against_reference(self, m, k, n, layers, split_k):
        from pallas_kernels.fp8_matmul.mgpu import Tiles, fp8_matmul_mgpu

        tiles = None if split_k is None else Tiles(split_k=split_k)

        rng = np.random.default_rng(m + k)
        x, w, w_scale = make_inputs(rng, m, k, n * layers)
        w, w_scale = w.reshape(layers, n, k), w_scale.reshape(layers, n)
        layer = layers - 1  # the last layer: the offset into the stack is exercised
        out = np.asarray(fp8_matmul_mgpu(x, w, w_scale, layer=jnp.int32(layer), out_dtype=F32, tiles=tiles), np.float64)
        ref = np.asarray(fp8_matmul_reference(x, w[layer], w_scale[layer], out_dtype=F32), np.float64)
        assert out.shape == (m, n) and np.isfinite(out).all()
        err = np.abs(out - ref).max() / np.abs(ref).max()
        # Hopper's fp8 wgmma sums each 128-long K step with fewer bits than f32: measured
        # 1.3-3.7e-4 of the largest element (XLA's fp8 dot, summing all of K so: 5e-3 to 1.5e-2).
        # A wrong layer, scale or tile is off by O(1).
        assert err < 1e-3, err
        out16 = np.asarray(fp8_matmul_mgpu(x, w, w_scale, layer=layer, tiles=tiles), np.float64)
        assert np.abs(out16 - ref).max() / np.abs(ref).max() < 1e-2
