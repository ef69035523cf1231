"""Speculative decoding (issue 21): the output is plain decoding's, token for token (greedy and
seeded sampling), its distribution is the target's, and everything else keeps working: batches
mixing speculating and plain requests, the prefix cache, preemption, abort, stop strings,
max_tokens, logprobs, no new programs. The reference is the same engine without speculation
(itself checked against transformers in test_engine.py)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_warmup import COMPILES

from mistral_jax import LLM, SamplingParams
from mistral_jax.engine.speculative import SpeculativeConfig, ngram_propose
from mistral_jax.loading.checkpoint import CheckpointError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def ngram(k):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# ---- the proposer -------------------------------------------------------------------------------


def brute_force_propose(tokens, k, n_min, n_max):
    """The definition, spelled out: longest n in [n_min, n_max] whose last n tokens occur earlier
    with a token after them; the k tokens after the latest such occurrence that has k after it,
    else what follows the latest one."""
    N = len(tokens)
    for n in range(min(n_max, N - 1), n_min - 1, -1):
        suffix = list(tokens[N - n :])
        starts = [i for i in range(0, N - n) if list(tokens[i : i + n]) == suffix]
        if starts:
            whole = [i for i in starts if i + n + k <= N]
            i = whole[-1] if whole else starts[-1]
            return list(tokens[i + n : i + n + k])
    return []


@pytest.mark.parametrize("alphabet", [2, 3, 6, 40])
def test_ngram_proposer_matches_its_definition(alphabet):
    rng = np.random.default_rng(alphabet)
    hits = 0
    for _trial in range(300):
        tokens = rng.integers(0, alphabet, size=int(rng.integers(1, 60))).astype(np.int32)
        n_min = int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 4))
        k = int(rng.integers(1, 7))
        got = ngram_propose(tokens, k, n_min, n_max).tolist()
        assert got == brute_force_propose(tokens, k, n_min, n_max), (tokens.tolist(), k, n_min, n_max)
        hits += bool(got)
    assert hits > 30  # the cases exercise matches, not only misses


def test_bad_speculative_settings_fail_clearly(tiny_checkpoints):
    cases = [({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
             ({"method": "eagle", "num_speculative_tokens": 2}, "method='eagle' is not supported"),
             ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
             ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
              "prompt_lookup_min=4"),
             ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys"),
             ('{"method": "ngram", ', "not valid JSON")]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=64, progress=False,
                speculative_config=spec)
    assert SpeculativeConfig.parse(json.dumps(ngram(3))) == SpeculativeConfig(**ngram(3))


# ---- exactness on the tiny random model --------------------------------------------------------


def make_llm(path, spec=None, **kw):
    kw = {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 64, **kw}
    return LLM(model=str(path), dtype="float32", progress=False, speculative_config=spec, **kw)


def repetitive_prompts(n, seed, vocab=32768):
    """Prompts that repeat a random phrase (prompt lookup finds matches) and plain random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        phrase = rng.integers(5, vocab, size=int(rng.integers(3, 12))).tolist()
        noise = rng.integers(5, vocab, size=int(rng.integers(1, 20))).tolist()
        ids = phrase * int(rng.integers(2, 4)) + noise + phrase[: int(rng.integers(1, len(phrase)))]
        out.append({"prompt_token_ids": ids if i % 5 else noise + phrase})
    return out


def mixed_params(n, seed):
    """Greedy, seeded sampling, and penalties (those requests decode plainly in the same batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        max_tokens = int(rng.integers(1, 30))
        if i % 4 == 3:
            out.append(SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=i,
                                      repetition_penalty=1.3))
        elif i % 4 == 2:
            out.append(SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=max_tokens,
                                      ignore_eos=True))
        else:
            out.append(dataclasses.replace(GREEDY, max_tokens=max_tokens))
    return out


@pytest.fixture(scope="module")
def plain_outputs(tiny_checkpoints):
    llm = make_llm(tiny_checkpoints[0])
    prompts, params = repetitive_prompts(32, seed=1), mixed_params(32, seed=1)
    return prompts, params, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.slow
def test_speculation_gives_plain_decodings_tokens(tiny_checkpoints, plain_outputs, k):
    """32 requests in one batch of 8 seats and a 64-token step budget: greedy, seeded top-p/top-k
    sampling and penalty requests (which do not speculate) side by side, prefix cache on (the
    repeated phrases and a second pass hit it)."""
    prompts, params, expected = plain_outputs
    llm = make_llm(tiny_checkpoints[0], ngram(k))
    for _attempt in range(2):  # the second pass finds the prompts in the prefix cache
        outs = llm.generate(prompts, params)
        for o, want, sp in zip(outs, expected, params):
            assert o.outputs[0].token_ids == want
            assert len(want) == sp.max_tokens
    stats = llm.engine.speculator.stats
    # Both outcomes were exercised: drafts kept (tokens skipped ahead) and drafts rolled back.
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert llm.prefix_cache_stats().cached_tokens > 0
    assert llm.engine.allocator.num_used_pages == 0


@pytest.mark.slow
def test_speculation_survives_preemption(tiny_checkpoints):
    """A cache of 24 pages for 8 sequences that need up to 9 each: sequences are preempted
    (also while their drafts are in flight) and recomputed; outputs stay plain decoding's."""
    rng = np.random.default_rng(5)
    phrase = rng.integers(5, 32768, size=10).tolist()
    prompts = [{"prompt_token_ids": rng.integers(5, 32768, size=int(rng.integers(30, 80))).tolist() + phrase * 2}
               for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * 10
    want = [o.outputs[0].token_ids for o in make_llm(tiny_checkpoints[0], num_pages=200).generate(prompts, params)]
    llm = make_llm(tiny_checkpoints[0], ngram(4), num_pages=24, block_size=16)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    assert llm.engine.allocator.num_used_pages == 0


@pytest.mark.slow
def test_stop_strings_max_tokens_and_logprobs_as_plain(tiny_checkpoints):
    prompts = repetitive_prompts(6, seed=9)
    plain, spec = make_llm(tiny_checkpoints[0]), make_llm(tiny_checkpoints[0], ngram(4))
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    ref = plain.generate(prompts, base)
    # A stop string taken from the middle of each plain output: both engines cut at the same place.
    stops = [dataclasses.replace(base, stop=[o.outputs[0].text[len(o.outputs[0].text) // 2:][:3]]) for o in ref]
    for params in ([base] * len(prompts), stops):
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        for w, g in zip(want, got):
            w, g = w.outputs[0], g.outputs[0]
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
            assert [sorted(d) for d in g.logprobs] == [sorted(d) for d in w.logprobs]
            np.testing.assert_allclose([v for d in g.logprobs for v in d.values()],
                                       [v for d in w.logprobs for v in d.values()], atol=1e-4)
    assert any(o.outputs[0].finish_reason == "stop" for o in got)
    assert spec.engine.speculator.stats.num_accepted_tokens > 0


@pytest.mark.slow
def test_abort_with_drafts_in_flight_frees_pages(tiny_checkpoints):
    llm = make_llm(tiny_checkpoints[0], ngram(4))
    prompts = repetitive_prompts(6, seed=3)
    start = llm.engine.allocator.num_free_pages
    seen = {}
    for ev in llm.stream(prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
        seen[ev.request_id] = seen.get(ev.request_id, 0) + 1
        if seen[ev.request_id] == 5 and int(ev.request_id) % 2 == 0:
            assert llm.abort(ev.request_id)
    assert llm.engine.allocator.num_free_pages == start
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_speculation_adds_no_program(tiny_checkpoints):
    llm = make_llm(tiny_checkpoints[0], ngram(5), warmup=True)
    assert llm.warmup_programs == llm.engine.programs()
    compiles = COMPILES.count
    llm.generate(repetitive_prompts(12, seed=4), mixed_params(12, seed=4))
    llm.generate(repetitive_prompts(3, seed=4), GREEDY)
    assert llm.engine.speculator.stats.num_drafts > 0
    assert COMPILES.count == compiles


# ---- the distribution -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, tiny_cfg, tiny_checkpoints):
    """The tiny model with a 48-token vocabulary and a sharpened head: sampled text repeats itself
    often enough that prompt lookup proposes tokens the model may or may not draw."""
    from helpers.checkpoints import random_weights

    cfg = dataclasses.replace(tiny_cfg, vocab_size=48)
    weights = random_weights(cfg, seed=11)
    weights["output.weight"] *= 12.0
    path = tmp_path_factory.mktemp("small_vocab")
    (path / "params.json").write_text(json.dumps(cfg.to_mistral_params()))
    save_file(weights, str(path / "consolidated.safetensors"))
    shutil.copy(tiny_checkpoints[0] / "tokenizer.model.v3", path)
    return path


def _chi_square_p(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """Two-sample chi-square (homogeneity) over token counts; rare tokens pooled."""
    from scipy.stats import chi2_contingency

    table = np.stack([np.bincount(a, minlength=vocab), np.bincount(b, minlength=vocab)])
    common = table.sum(0) >= 10
    table = np.concatenate([table[:, common], table[:, ~common].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    return chi2_contingency(table).pvalue


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.slow
def test_speculative_sampling_follows_the_target_distribution(small_vocab_model, top_p):
    """600 samples of 6 tokens at temperature 1 with speculation, 600 without, other seeds: each
    position's token distribution is the same (chi-square); the same seeds give the same tokens."""
    n, length = 600, 6
    prompt = {"prompt_token_ids": [1, 7, 9, 7, 9, 7, 9, 30, 7, 9]}
    plain, spec = make_llm(small_vocab_model, max_num_seqs=64), make_llm(small_vocab_model, ngram(3), max_num_seqs=64)
    run = lambda llm, seeds: np.array([o.outputs[0].token_ids for o in llm.generate(
        [prompt] * n, [SamplingParams(temperature=1.0, top_p=top_p, seed=int(s), max_tokens=length, ignore_eos=True)
                       for s in seeds])])
    a, b = run(spec, range(n)), run(plain, range(10_000, 10_000 + n))
    for pos in range(length):
        assert _chi_square_p(a[:, pos], b[:, pos], 48) > 1e-3, pos
    assert (run(plain, range(n)) == a).all()
    stats = spec.engine.speculator.stats
    assert 0.05 < stats.acceptance_rate < 0.95  # both outcomes common: the test can tell them apart


# ---- the draft-model proposer -------------------------------------------------------------------


def draft(path, k):
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory, tiny_cfg, tiny_checkpoints):
    """Another random model of the tiny shape (seed 1): a draft that seldom agrees."""
    from helpers.checkpoints import make_tiny_mistral_checkpoint

    path = tmp_path_factory.mktemp("other_tiny")
    make_tiny_mistral_checkpoint(path, tiny_cfg, seed=1)
    shutil.copy(tiny_checkpoints[0] / "tokenizer.model.v3", path)
    return path


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.slow
def test_a_model_drafting_for_itself_is_always_accepted(tiny_checkpoints, plain_outputs, k):
    prompts, params, expected = plain_outputs
    llm = make_llm(tiny_checkpoints[0], draft(tiny_checkpoints[0], k))
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.speculator.stats
    greedy_rows = [sp.greedy for sp in params]
    assert stats.num_draft_tokens > 50 and any(greedy_rows)
    # Its greedy drafts are the target's greedy tokens; seeded rows accept them only when the
    # draw agrees, so only an all-greedy run is 100%.
    greedy = make_llm(tiny_checkpoints[0], draft(tiny_checkpoints[0], k))
    greedy.generate(prompts, GREEDY)
    assert greedy.engine.speculator.stats.acceptance_rate == 1.0
    assert llm.engine.allocator.num_used_pages == 0


@pytest.mark.slow
def test_a_different_draft_is_mostly_rejected_and_changes_nothing(tiny_checkpoints, other_tiny):
    """With the prefix cache (second pass) and a cache small enough to preempt."""
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": rng.integers(5, 32768, size=int(rng.integers(20, 90))).tolist()} for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)] * 10
    want = [o.outputs[0].token_ids for o in make_llm(tiny_checkpoints[0], num_pages=200).generate(prompts, params)]
    llm = make_llm(tiny_checkpoints[0], draft(other_tiny, 3), num_pages=24)
    for _attempt in range(2):
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.speculator.stats
    assert stats.num_drafts > 0 and stats.acceptance_rate < 0.5
    assert llm.engine.allocator.num_used_pages == 0


@pytest.mark.slow
def test_draft_model_errors_name_the_problem(tiny_checkpoints, small_vocab_model):
    with pytest.raises(ValueError, match="the draft model's vocabulary has 48 tokens, the target's 32768"):
        make_llm(tiny_checkpoints[0], draft(small_vocab_model, 3))
    with pytest.raises(ValueError, match="needs a model"):
        make_llm(tiny_checkpoints[0], {"method": "draft_model", "num_speculative_tokens": 3})
    with pytest.raises(CheckpointError, match="missing: no such file"):
        make_llm(tiny_checkpoints[0], draft(tiny_checkpoints[0] / "missing", 3))


@pytest.mark.slow
def test_draft_model_adds_only_its_own_programs(tiny_checkpoints, other_tiny):
    llm = make_llm(tiny_checkpoints[0], draft(other_tiny, 4), warmup=True)
    buckets = len(llm.engine.token_buckets())
    # step, prompt logprobs and draft step per token bucket; top logprobs per sequence bucket (1,
    # 2, 4, 8); the penalty-row reset; the proposal per row bucket (8: max_num_seqs 8)
    assert llm.warmup_programs == llm.engine.programs() == 3 * buckets + 4 + 1 + 1
    compiles = COMPILES.count
    llm.generate(repetitive_prompts(12, seed=4), mixed_params(12, seed=4))
    llm.generate(repetitive_prompts(3, seed=4), GREEDY)
    assert llm.engine.speculator.stats.num_drafts > 0
    assert COMPILES.count == compiles


@pytest.mark.slow
def test_default_model_ngram_gives_plain_decodings_tokens():
    """Real weights, real text, 32 chat requests in one batch: prompts that repeat their context
    (rewrite, quote) and open questions, greedy and seeded, beside penalty requests (plain)."""
    sentences = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
                 "Water boils at one hundred degrees Celsius at sea level.", "Cats sleep for most of the day.",
                 "The train leaves the station at seven in the morning.", "Bananas are rich in potassium.",
                 "A triangle has three sides and three angles.", "The library opens at nine on weekdays."]
    asks = ["Repeat this sentence exactly: {}", "Rewrite this sentence in capital letters: {}",
            "Quote this sentence, then say if it is true: {}", "What is a good title for this? {}"]
    convs = [[{"role": "user", "content": a.format(s)}] for s in sentences for a in asks]
    params = [SamplingParams(temperature=0, max_tokens=24) if i % 4 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=24) for i in range(len(convs))]
    params[5] = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.2)  # decodes plainly
    plain = LLM(max_model_len=512, progress=False)
    fast = LLM(max_model_len=512, progress=False, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    want = [o.outputs[0].token_ids for o in plain.chat(convs, params)]
    assert [o.outputs[0].token_ids for o in fast.chat(convs, params)] == want
    assert fast.engine.speculator.stats.num_accepted_tokens > 50


@pytest.mark.slow
def test_default_model_drafting_for_itself(tmp_path):
    """Real weights, real text: the demo model as its own draft is accepted every time, and
    gives the plain engine's text."""
    from mistral_jax.loading.default_model import default_model_path

    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
                 "Explain what a CPU does in one sentence."]
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = LLM(max_model_len=512, progress=False)
    fast = LLM(max_model_len=512, progress=False, speculative_config=draft(default_model_path(), 3))
    convs = [[{"role": "user", "content": q}] for q in questions]
    want = [o.outputs[0].token_ids for o in plain.chat(convs, params)]
    assert [o.outputs[0].token_ids for o in fast.chat(convs, params)] == want
    assert fast.engine.speculator.stats.acceptance_rate == 1.0


@pytest.mark.slow
def test_missing_proposals_back_off_to_plain_steps(tiny_checkpoints, other_tiny):
    """A draft that seldom agrees: after each miss the request runs 1, 2, 4, ... plain
    (pipelined) steps before it proposes again, so most of its tokens come from plain steps."""
    llm = make_llm(tiny_checkpoints[0], draft(other_tiny, 3))
    prompt = {"prompt_token_ids": np.random.default_rng(8).integers(5, 32768, size=40).tolist()}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))[0].outputs[0]
    stats = llm.engine.speculator.stats
    assert len(out.token_ids) == 120
    assert 0 < stats.num_drafts <= 20, stats


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.slow
def test_speculation_on_a_tensor_parallel_mesh(tiny_checkpoints, other_tiny, method):
    """tp=2 over the CPU's fake devices: drafts, verify rows and the draft's own cache sharded."""
    prompts, params = repetitive_prompts(8, seed=6), [dataclasses.replace(GREEDY, max_tokens=20)] * 8
    want = [o.outputs[0].token_ids for o in make_llm(tiny_checkpoints[0]).generate(prompts, params)]
    spec = ngram(3) if method == "ngram" else draft(other_tiny, 3)
    llm = make_llm(tiny_checkpoints[0], spec, mesh="tp=2")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.speculator.stats.num_drafts > 0
