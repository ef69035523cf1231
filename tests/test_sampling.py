"""Sampling: seeds, greedy, exact filter sets, penalties, distributions, logprobs, no recompiles."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.sample.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    SamplingArrays,
    SamplingParams,
    apply_penalties,
    init_penalty_state,
    keep_mask,
    sample,
    update_penalty_state,
)

TRACES = []  # one entry per trace of _sample: counts compilations


@functools.partial(jax.jit, static_argnames="num_logprobs")
def _sample(logits, arrays, step, counts, seen, num_logprobs=0):
    TRACES.append(num_logprobs)  # runs only while tracing
    return sample(logits, arrays, step, counts, seen, num_logprobs)


def run(logits, arrays, step=0, counts=None, seen=None, num_logprobs=0):
    """Sample from logits [batch, vocab] with fresh penalty state unless given."""
    batch, vocab = logits.shape
    counts = jnp.zeros((batch, vocab), jnp.int32) if counts is None else jnp.asarray(counts)
    seen = jnp.zeros((batch, vocab), bool) if seen is None else jnp.asarray(seen)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (batch,))
    return jax.device_get(_sample(jnp.asarray(logits), arrays, step, counts, seen, num_logprobs=num_logprobs))


def tile(params: SamplingParams, n: int) -> SamplingArrays:
    """n rows with the same params (and seed)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), SamplingArrays.from_params([params]))


def draws(logits_row, params: SamplingParams, n: int) -> np.ndarray:
    """n draws from one distribution: the same seed at steps 0..n-1."""
    logits = np.broadcast_to(np.asarray(logits_row, np.float32), (n, len(logits_row)))
    return run(logits, tile(params, n), step=np.arange(n)).tokens


def random_logits(seed, shape, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- seeds ------------------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch():
    vocab, steps = 500, 8
    logits = random_logits(0, (steps, vocab))
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=5, top_k=20),
              SamplingParams(min_p=0.05), SamplingParams(temperature=1.3, repetition_penalty=1.2, seed=7)]

    def generate(params, row, batch):
        arrays = SamplingArrays.from_params(params, pad_to=batch)
        noise = random_logits(row + batch, (batch, vocab))  # other rows see other logits
        out = []
        for s in range(steps):
            noise[row] = logits[s]
            out.append(int(run(noise, arrays, step=s).tokens[row]))
        return out

    alone = generate([sp], 0, 1)
    assert generate(others[:3] + [sp] + others[3:], 3, 8) == alone
    assert generate([sp] + others, 0, 5) == alone
    assert generate([dataclasses.replace(sp, seed=99)], 0, 1) != alone
    assert len(set(alone)) > 1  # the steps differ too


def test_large_and_negative_seeds_are_accepted_and_distinct():
    logits = random_logits(1, (1, 1000))
    outs = {tuple(draws(logits[0], SamplingParams(seed=s), 16)) for s in (0, 1, 2**32, 2**63 + 1, -1)}
    assert len(outs) == 5


def test_unseeded_rows_get_fresh_seeds():
    a = SamplingArrays.from_params([SamplingParams()] * 2)
    b = SamplingArrays.from_params([SamplingParams()])
    assert not np.array_equal(a.seed[0], a.seed[1]) and not np.array_equal(a.seed[0], b.seed[0])


# ---- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = jnp.asarray(random_logits(2, (6, 300)), dtype)
    want = np.argmax(np.asarray(logits, np.float32), -1)
    only_greedy = SamplingArrays.from_params([SamplingParams(temperature=0.0, seed=i) for i in range(6)])
    assert np.array_equal(run(logits, only_greedy).tokens, want)
    # Mixed with sampled rows (the other code path), temperature below 1e-5 is greedy too.
    mixed = SamplingArrays.from_params([SamplingParams(temperature=1e-6), SamplingParams(temperature=1.0)] * 3)
    assert np.array_equal(run(logits, mixed).tokens[::2], want[::2])


def test_padding_rows_are_greedy():
    arrays = SamplingArrays.from_params([SamplingParams(temperature=1.0)], pad_to=4)
    assert arrays.greedy.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="pad_to"):
        SamplingArrays.from_params([SamplingParams()] * 3, pad_to=2)


# ---- filters: exact kept sets -----------------------------------------------------------------

PROBS = np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
LOGITS = np.log(PROBS).astype(np.float32)


def mask(logits, top_k=0, top_p=1.0, min_p=0.0):
    """keep_mask for one row, as the set of kept ids."""
    m = keep_mask(jnp.asarray(logits, jnp.float32)[None], jnp.array([top_k]), jnp.array([top_p], jnp.float32),
                  jnp.array([min_p], jnp.float32))
    return set(np.flatnonzero(np.asarray(m[0])).tolist())


@pytest.mark.parametrize("kw, kept", [
    ({}, set(range(10))),
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_k": 1}, {0}),
    ({"top_k": 50}, set(range(10))),  # larger than the vocab: off
    ({"top_p": 0.45}, {0, 1}),  # 0.30 < 0.45 <= 0.50
    ({"top_p": 0.55}, {0, 1, 2}),
    ({"top_p": 0.01}, {0}),  # always at least one token
    ({"min_p": 0.6}, {0, 1}),  # p >= 0.18
    ({"min_p": 0.3}, {0, 1, 2, 3}),  # p >= 0.09
    ({"min_p": 1.0}, {0}),
    ({"top_k": 4, "top_p": 0.6}, {0, 1}),  # top-p over the top-4 renormalized: 0.30/0.75 = 0.4, 0.67
    ({"top_k": 5, "top_p": 0.9, "min_p": 0.4}, {0, 1, 2}),
])
def test_keep_mask_exact_sets(kw, kept):
    assert mask(LOGITS, **kw) == kept


def test_keep_mask_keeps_ties():
    tied = np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], np.float32)
    assert mask(tied, top_k=2) == {0, 1, 2, 3}  # every token equal to the 2nd largest
    assert mask(tied, top_p=0.7) == {0, 1, 2, 3}  # tied with the last token of the prefix
    assert mask(tied, min_p=np.exp(-1.0) - 1e-6) == {0, 1, 2, 3}


def np_keep_mask(x, k, p, m):
    """Reference in float64. Returns (mask, near_boundary)."""
    x = np.asarray(x, np.float64)
    keep = np.ones(len(x), bool)
    if k > 0:
        keep &= x >= np.sort(x)[::-1][min(k, len(x)) - 1]
    near = False
    if p < 1:
        probs = np.exp(log_softmax(np.where(keep, x, -np.inf)))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        near |= bool(np.any(np.abs(before - p) < 1e-4))
        keep &= probs >= probs[order][max(1, np.sum(before < p)) - 1]
    ratio = np.exp(x - x.max())
    near |= m > 0 and bool(np.any(np.abs(ratio - m) < 1e-4))
    return keep & (ratio >= m), near


def test_keep_mask_matches_numpy_on_random_rows():
    rng = np.random.default_rng(3)
    n, vocab = 400, 64
    x = random_logits(4, (n, vocab), scale=2.0)
    k = rng.choice([0, 1, 2, 5, 17, 64, 100], n).astype(np.int32)
    p = rng.choice([1.0, 0.999, 0.9, 0.5, 0.1], n).astype(np.float32)
    m = rng.choice([0.0, 0.01, 0.1, 0.5], n).astype(np.float32)
    got = np.asarray(keep_mask(jnp.asarray(x), jnp.asarray(k), jnp.asarray(p), jnp.asarray(m)))
    checked = 0
    for i in range(n):
        want, near = np_keep_mask(x[i], k[i], float(p[i]), float(m[i]))
        if not near:
            assert np.array_equal(got[i], want), (i, k[i], p[i], m[i])
            checked += 1
    assert checked > 0.9 * n, checked


@pytest.mark.parametrize("kw, kept", [
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.55}, {0, 1, 2}),
    ({"min_p": 0.3}, {0, 1, 2, 3}),
    ({"top_k": 6, "top_p": 0.8, "min_p": 0.25}, {0, 1, 2, 3}),
])
def test_sampling_draws_exactly_the_kept_set(kw, kept):
    tokens = draws(LOGITS, SamplingParams(temperature=1.0, seed=11, **kw), 4000)
    assert set(tokens.tolist()) == kept


def test_sampled_tokens_stay_in_set_after_temperature():
    # Temperature changes which tokens pass top-p and min-p: filters act on the scaled logits.
    sp = SamplingParams(temperature=0.5, top_p=0.55, seed=3)  # p^2 renormalized: 0.39, 0.17, ...
    assert set(draws(LOGITS, sp, 4000).tolist()) == mask(LOGITS / 0.5, top_p=0.55) == {0, 1}


# ---- penalties --------------------------------------------------------------------------------


def np_penalties(x, counts, seen, rep, pres, freq):
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    return x - freq * counts - pres * (counts > 0)


def test_penalties_match_formulas():
    batch, vocab = 4, 50
    rng = np.random.default_rng(5)
    x = random_logits(6, (batch, vocab))
    counts = rng.integers(0, 3, (batch, vocab)) * (rng.random((batch, vocab)) < 0.3)
    seen = (counts > 0) | (rng.random((batch, vocab)) < 0.2)  # the prompt adds more seen tokens
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
              SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=1.5),
              SamplingParams(), SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=-2.0)]
    arrays = SamplingArrays.from_params(params)
    got = apply_penalties(jnp.asarray(x), arrays, jnp.asarray(counts, jnp.int32), jnp.asarray(seen))
    for i, p in enumerate(params):
        want = np_penalties(x[i], counts[i], seen[i], p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[2]), x[2])  # defaults change nothing
    # Greedy takes the argmax of the penalized logits; logprob stays that of the raw ones.
    out = run(x, arrays, counts=counts.astype(np.int32), seen=seen)
    assert out.tokens[3] == np.argmax(np_penalties(x[3], counts[3], seen[3], 2.0, 0.0, -2.0))
    np.testing.assert_allclose(out.logprob, log_softmax(x)[np.arange(batch), out.tokens], atol=1e-5)


def test_penalty_state():
    prompt = jnp.array([[3, 1, 3, 0], [2, 0, 0, 0]])  # right-padded with 0
    counts, seen = init_penalty_state(prompt, jnp.array([3, 1]), 6)
    assert np.asarray(seen).tolist() == [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]  # pad 0 not seen
    assert not np.asarray(counts).any()
    counts, seen = update_penalty_state(counts, seen, jnp.array([5, 2]))
    counts, seen = update_penalty_state(counts, seen, jnp.array([5, 0]))
    assert np.asarray(counts).tolist() == [[0, 0, 0, 0, 0, 2], [1, 0, 1, 0, 0, 0]]
    assert np.asarray(seen).tolist() == [[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]]


def test_repetition_penalty_steers_sampling():
    x = np.array([[2.0, 1.9, -5.0]], np.float32)
    arrays = SamplingArrays.from_params([SamplingParams(temperature=0, repetition_penalty=1.5)])
    assert run(x, arrays, seen=np.array([[True, False, False]])).tokens[0] == 1


# ---- distributions ----------------------------------------------------------------------------


def chi_square_ok(counts, probs):
    """Chi-square goodness of fit at the 0.001 level."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    try:
        from scipy.stats import chi2

        crit = chi2.ppf(0.999, len(probs) - 1)
    except ImportError:
        crit = {9: 27.877, 2: 13.816}[len(probs) - 1]
    return stat < crit, stat, crit


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_temperature_sampling_follows_softmax(temperature):
    x = random_logits(7, (10,), scale=1.0)
    tokens = draws(x, SamplingParams(temperature=temperature, seed=21), 20000)
    probs = np.exp(log_softmax(x / temperature))
    ok, stat, crit = chi_square_ok(np.bincount(tokens, minlength=10), probs)
    assert ok, (stat, crit)
    # The test has power: the untempered distribution is rejected.
    assert not chi_square_ok(np.bincount(tokens, minlength=10), np.exp(log_softmax(x)))[0]


def test_filtered_sampling_renormalizes():
    tokens = draws(LOGITS, SamplingParams(top_k=3, seed=8), 20000)
    ok, stat, crit = chi_square_ok(np.bincount(tokens, minlength=3), PROBS[:3] / PROBS[:3].sum())
    assert ok, (stat, crit)


# ---- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution():
    batch, vocab, n = 5, 200, 4
    x = random_logits(9, (batch, vocab))
    params = [SamplingParams(temperature=0.5, top_k=10, seed=1, logprobs=n), SamplingParams(temperature=0),
              SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, seed=2), SamplingParams(top_p=0.3),
              SamplingParams(temperature=2.0, min_p=0.1)]
    counts = np.random.default_rng(0).integers(0, 2, (batch, vocab)).astype(np.int32)
    out = run(x, SamplingArrays.from_params(params), counts=counts, seen=counts > 0, num_logprobs=n)
    ref = log_softmax(x)
    np.testing.assert_allclose(out.logprob, ref[np.arange(batch), out.tokens], atol=1e-5)
    want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :n]
    np.testing.assert_array_equal(out.top_ids, want_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, want_ids, -1), atol=1e-5)
    assert out.top_ids.dtype == np.int32 and out.tokens.dtype == np.int32


@pytest.mark.parametrize("vocab,k", [(49152, 20), (32000, 20), (4096, 5), (3000, 20), (2048, 1)])
def test_top_k_over_vocab_in_chunks_equals_lax_top_k(vocab, k):
    # Chunked top-k (each chunk's top k, then a merge) against one lax.top_k over the row, with
    # many ties (values rounded), -inf entries and NumPy's stable argsort as a third opinion.
    from mistral_jax.sample.sampling import _vocab_chunks, top_k_over_vocab

    rng = np.random.default_rng(vocab + k)
    x = np.round(rng.normal(size=(3, vocab)), 1).astype(np.float32)
    x[0, rng.integers(0, vocab, vocab // 3)] = -np.inf
    values, ids = jax.jit(lambda a: top_k_over_vocab(a, k, chunk=1024))(x)  # GPUs' chunk
    want_values, want_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-x, axis=-1, kind="stable")[:, :k])
    assert ids.dtype == jnp.int32
    assert (_vocab_chunks(vocab, k, 1024) > 1) == (vocab >= 2048)  # the two-round path ran where it can


def test_no_top_logprobs_when_not_asked():
    out = run(random_logits(10, (2, 30)), SamplingArrays.from_params([SamplingParams()] * 2))
    assert out.top_ids is None and out.top_logprobs is None


# ---- compilation ------------------------------------------------------------------------------


def test_one_compilation_serves_any_mix_of_settings():
    batch, vocab = 4, 128
    mixes = [
        [SamplingParams(temperature=0)] * 4,
        [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.5)],
        [SamplingParams(min_p=0.2, repetition_penalty=1.3), SamplingParams(temperature=0.3, presence_penalty=1.0)] * 2,
        [SamplingParams(temperature=2.0, top_k=-1, frequency_penalty=-0.5, seed=2**40)],  # padded to 4
    ]
    x = random_logits(11, (batch, vocab))
    run(x, SamplingArrays.from_params(mixes[0], pad_to=batch))  # warm-up
    before = len(TRACES)
    for step, mix in enumerate(mixes):
        run(x, SamplingArrays.from_params(mix, pad_to=batch), step=step)
    assert len(TRACES) == before


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("n", 0),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("seed", 1.5), ("seed", "42"), ("seed", True),
    ("stop", ""), ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]),
    ("ignore_eos", "yes"), ("skip_special_tokens", None),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.0),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("prompt_logprobs", -1), ("prompt_logprobs", 100),
    ("logit_bias", {"5": 101}), ("logit_bias", {5: -100.5}), ("logit_bias", {"5": float("nan")}),
    ("logit_bias", {"5": True}), ("logit_bias", {"5": "1"}), ("logit_bias", {"abc": 1}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {-1: 1}), ("logit_bias", {"1.5": 1}), ("logit_bias", {2.0: 1}), ("logit_bias", {"5": 1, 5: 2}),
    ("logit_bias", {"05": 1, "5": 2}), ("logit_bias", [(5, 1)]), ("logit_bias", "5"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=") as err:
        SamplingParams(**{field: value})
    assert "allowed" in str(err.value)


def test_valid_edge_values_and_normalization():
    p = SamplingParams(temperature=0, top_p=1e-6, top_k=-1, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                       seed=-3, stop="###", max_tokens=None, logprobs=MAX_LOGPROBS, prompt_logprobs=0)
    assert p.greedy and p.stop == ["###"] and p.stop_token_ids == []
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(seed=np.int64(7)).seed == 7
    bias = SamplingParams(logit_bias={"5": 1, 7: -100, np.int64(9): np.float32(0.5), "0": 100}).logit_bias
    assert bias == {5: 1.0, 7: -100.0, 9: 0.5, 0: 100.0} and all(type(t) is int for t in bias)
    assert all(type(v) is float for v in bias.values())
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_logit_bias_entries_are_capped():
    most = {str(t): -100 for t in range(MAX_LOGIT_BIAS)}
    assert len(SamplingParams(logit_bias=most).logit_bias) == MAX_LOGIT_BIAS
    with pytest.raises(ValueError, match=rf"SamplingParams\.logit_bias has {MAX_LOGIT_BIAS + 1} entries.*allowed"):
        SamplingParams(logit_bias={**most, str(MAX_LOGIT_BIAS): 1})


def test_argmax_rows_is_jnp_argmax():
    """The sampler's argmax (two reductions on a CPU) picks what jnp.argmax picks: the first of
    tied maxima, the first NaN of a row that has one, index 0 of a row of -inf."""
    from mistral_jax.sample.sampling import argmax_rows

    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 1000)).astype(np.float32)
    x[1, [10, 500, 900]] = 9.0  # ties
    x[2, [3, 700]] = np.nan
    x[3] = -np.inf
    x[4, 999] = np.inf
    x[5] = np.round(x[5])  # many ties below the max
    got = np.asarray(jax.jit(argmax_rows)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert list(got[1:5]) == [10, 3, 0, 999]


# ---- logit bias ---------------------------------------------------------------------------------


def padded_bias(arrays: SamplingArrays) -> SamplingArrays:
    """arrays with all-padding bias arrays where they have none (as the engine's step has them)."""
    if arrays.bias_ids is not None:
        return arrays
    batch = len(arrays.greedy)
    return arrays.replace(bias_ids=np.full((batch, MAX_LOGIT_BIAS), -1, np.int32),
                          bias_values=np.zeros((batch, MAX_LOGIT_BIAS), np.float32))


def test_a_bias_of_minus_100_bans_the_top_token_sampled_and_greedy():
    vocab, n = 64, 2000
    row = random_logits(20, (vocab,))
    top = int(np.argmax(row))
    row[top] += 4.0  # drawn nearly always at temperature 1, unbiased
    logits = np.broadcast_to(row, (n, vocab))
    sampled = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]  # many seeds, one row each
    free = run(logits, SamplingArrays.from_params(sampled)).tokens
    assert np.mean(free == top) > 0.9  # what the ban has to undo
    banned = [dataclasses.replace(p, logit_bias={top: -100}) for p in sampled]
    assert top not in run(logits, SamplingArrays.from_params(banned)).tokens
    # Greedy: the argmax of the biased logits, the runner-up, on the all-greedy path and beside sampled rows.
    second = int(np.argsort(-row)[1])
    greedy = SamplingParams(temperature=0, logit_bias={str(top): -100.0})
    assert run(logits[:4], SamplingArrays.from_params([greedy] * 4)).tokens.tolist() == [second] * 4
    mixed = run(logits[:4], SamplingArrays.from_params([greedy, sampled[0], greedy, banned[1]])).tokens
    assert mixed[0] == mixed[2] == second and mixed[1] == free[0] and mixed[3] != top


def test_a_bias_of_plus_100_forces_a_token():
    vocab = 64
    logits = random_logits(21, (8, vocab))
    low = np.argmin(logits, axis=-1)  # each row's least likely token
    params = [SamplingParams(temperature=t, seed=r, logit_bias={int(low[r]): 100})
              for r, t in enumerate([0, 1.0, 2.0, 0, 0.5, 1.0, 1.5, 0])]
    for step in range(20):
        assert np.array_equal(run(logits, SamplingArrays.from_params(params), step=step).tokens, low)


def test_rows_without_a_bias_are_unchanged_bit_for_bit_and_one_program_serves_any_bias():
    """Rows without a bias give the same tokens and logprobs, to the bit, whether no row of the
    batch has a bias (no bias arrays), the arrays are all padding (the engine's unbiased steps)
    or other rows have biases; logprobs are the raw model's (before the bias), biased rows too.
    Any biases run in the program compiled for all-padding arrays."""
    batch, vocab, n = 6, 300, 5
    x = random_logits(22, (batch, vocab))
    counts = np.random.default_rng(1).integers(0, 2, (batch, vocab)).astype(np.int32)
    plain = [SamplingParams(temperature=0.8, top_k=40, seed=1, logprobs=n), SamplingParams(temperature=0),
             SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, seed=2), SamplingParams(top_p=0.7, seed=3),
             SamplingParams(temperature=1.5, min_p=0.05, seed=4), SamplingParams(temperature=0, frequency_penalty=1)]
    biased_rows = {1: {int(np.argmax(x[1])): -100, 7: 2.5}, 4: {str(t): 5.0 for t in range(0, vocab, 3)}}
    params = [dataclasses.replace(p, logit_bias=biased_rows.get(r)) for r, p in enumerate(plain)]

    def sample_all(arrays, step):
        return run(x, arrays, step=step, counts=counts, seen=counts > 0, num_logprobs=n)

    unbiased = [r for r in range(batch) if r not in biased_rows]
    ref = log_softmax(x)
    sample_all(padded_bias(SamplingArrays.from_params(plain)), 0)  # compiles the program with bias arrays
    before = len(TRACES)
    for step in range(4):
        none = sample_all(SamplingArrays.from_params(plain), step)
        padding = sample_all(padded_bias(SamplingArrays.from_params(plain)), step)
        some = sample_all(SamplingArrays.from_params(params), step)
        for out in (padding, some):
            for field in ("tokens", "logprob", "top_ids", "top_logprobs"):
                a, b = getattr(none, field)[unbiased], getattr(out, field)[unbiased]
                assert a.tobytes() == b.tobytes(), (step, field)
        assert some.tokens[1] != np.argmax(x[1])  # the bias is applied: the greedy row's top is banned
        np.testing.assert_allclose(some.logprob, ref[np.arange(batch), some.tokens], atol=1e-5)
        np.testing.assert_array_equal(some.top_ids, none.top_ids)  # raw distribution, biased rows too
    assert len(TRACES) == before + 1  # the first `none` (no bias arrays: its own pytree); nothing for any bias


class _Lowerings:
    """Every jaxpr -> MLIR lowering in the process (any jit cache miss, whatever the function)."""

    count = 0

    @classmethod
    def listen(cls, event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            cls.count += 1


jax.monitoring.register_event_duration_secs_listener(_Lowerings.listen)


@pytest.mark.slow
def test_engine_bans_tokens_and_a_biased_request_joining_a_batch_compiles_nothing(tiny_checkpoints):
    """Two requests run, then two more join; the second time the late ones carry a bias of -100
    on the token each produced most the first time. That token never appears (greedy and
    sampled, 48 tokens each), the unbiased requests' tokens are unchanged, and the biased run
    lowers no new program: it runs the steps the first run compiled."""
    from mistral_jax import LLM

    # No prefix cache: the second run's prompts then take the first run's steps exactly.
    llm = LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, enable_prefix_caching=False,
              progress=False)
    engine = llm.engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 32768, size=n).tolist() for n in (20, 25, 30, 35)]
    kw = dict(max_tokens=48, ignore_eos=True)
    first = [SamplingParams(temperature=0, **kw), SamplingParams(temperature=1.0, seed=1, **kw)]
    late = [SamplingParams(temperature=0, **kw), SamplingParams(temperature=1.0, seed=2, **kw)]

    def generate(late_params):
        out = {}
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:2], first)]

        def record(events):
            for e in events:
                if e.token_id is not None:
                    out.setdefault(e.request_id, []).append(e.token_id)

        for _ in range(4):
            record(engine.step())
        ids += [engine.add_request(p, sp) for p, sp in zip(prompts[2:], late_params)]
        while engine.has_unfinished_requests():
            record(engine.step())
        return [out[i] for i in ids]

    base = generate(late)
    banned = [collections.Counter(tokens).most_common(1)[0][0] for tokens in base[2:]]
    before = _Lowerings.count
    biased = generate([dataclasses.replace(sp, logit_bias={t: -100}) for sp, t in zip(late, banned)])
    assert _Lowerings.count == before
    assert biased[:2] == base[:2]
    assert all(len(tokens) == 48 for tokens in biased)
    assert banned[0] not in biased[2] and banned[1] not in biased[3]


def test_logit_bias_keeps_the_vocabulary_sharded():
    """Logits split over tp=8 (as the model's head leaves them): the bias scatter runs per shard,
    each device adding the entries of its own part of the vocabulary; the step's own computation
    gathers no [rows, vocab] array for it, and the tokens are the unsharded ones."""
    import math
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mistral_jax.runtime.sharding import parse_mesh, use_mesh

    mesh, vocab, rows = parse_mesh("tp=8"), 32768, 4
    x = random_logits(23, (rows, vocab))
    tops = np.argsort(-x, axis=-1)[:, :2]
    params = [SamplingParams(temperature=0, logit_bias={int(tops[r, 0]): -100, 5000 * r + 7: 0.5}) for r in range(3)]
    arrays = SamplingArrays.from_params(params + [SamplingParams(temperature=0, logit_bias={vocab - 1: 100})])
    state = (jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool))
    step = jnp.zeros(rows, jnp.int32)
    split = NamedSharding(mesh, P(None, "tp"))
    fn = jax.jit(sample)
    args = (jax.device_put(x, split), arrays, step, *(jax.device_put(z, split) for z in state))
    with use_mesh(mesh):
        hlo = fn.lower(*args).compile().as_text()
        sharded = fn(*args).tokens
    entry = hlo[hlo.index("\nENTRY"):].split("\n}\n")[0]  # the step's own computation, not its branches
    gathers = [ln for ln in entry.splitlines() if "all-gather(" in ln
               and math.prod(map(int, re.search(r"\[([\d,]+)\]", ln.split("all-gather(")[0]).group(1).split(",")))
               >= rows * vocab]
    assert not gathers, gathers[:2]
    assert np.asarray(sharded).tolist() == [*tops[:3, 1], vocab - 1]
    assert np.asarray(sharded).tolist() == fn(x, arrays, step, *state).tokens.tolist()


def test_the_step_wire_carries_the_bias_bit_for_bit():
    """The engine's step takes the bias apart from its third int32 array (step_inputs.py): the
    ids and the values' bits the host packed, padding included; none when no row has a bias."""
    from mistral_jax.engine.step_inputs import BIAS_COLUMNS, empty_inputs, from_wire, no_bias, to_wire

    params = [SamplingParams(logit_bias={3: -100, "70000": 1e-7, 5: -0.0}), SamplingParams(),
              SamplingParams(temperature=0, logit_bias={str(t): t / 7 for t in range(MAX_LOGIT_BIAS)})]
    sampling = SamplingArrays.from_params(params, pad_to=4)
    wire = to_wire(empty_inputs(T=8, S=4, pages=2, no_slot=8), sampling)
    assert wire.bias.shape == (4, BIAS_COLUMNS) and wire.bias.dtype == np.int32
    _, got = jax.jit(from_wire)(wire)
    for name in ("bias_ids", "bias_values"):
        assert np.asarray(getattr(got, name)).tobytes() == getattr(sampling, name).tobytes(), name
    assert sampling.bias_ids[0, :4].tolist() == [3, 70000, 5, -1] and sampling.bias_ids[1].max() == -1
    unbiased = SamplingArrays.from_params(params[1:2], pad_to=4)
    assert to_wire(empty_inputs(T=8, S=4, pages=2, no_slot=8), unbiased).bias is None
    _, padding = from_wire(wire.replace(bias=no_bias(4)))
    assert (np.asarray(padding.bias_ids) == -1).all() and not np.asarray(padding.bias_values).any()
