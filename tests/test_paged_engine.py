"""The serving engine under load: continuous batching, chunked prefill, prefix cache, preemption,
abort. The reference for every output is the same request run alone through a roomy engine
(whose logits are themselves checked against transformers in test_engine.py)."""

import dataclasses

import numpy as np
import pytest

from mistral_jax import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make_llm(tiny_checkpoints, **kw):
    kw.setdefault("max_model_len", 256)
    return LLM(model=str(tiny_checkpoints[0]), dtype="float32", progress=False, **kw)


@pytest.fixture(scope="module")
def alone(tiny_checkpoints):
    """Runs each request by itself: no batching, no prefix cache, whole-prompt prefill."""
    llm = make_llm(tiny_checkpoints, enable_prefix_caching=False, max_num_batched_tokens=256)

    def run(prompt, params):
        return llm.generate([prompt], params)[0].outputs[0].token_ids

    return run


def random_prompts(n, seed, lo=3, hi=120, prefix=()):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": list(prefix) + rng.integers(5, 32768, size=int(rng.integers(lo, hi))).tolist()}
            for _ in range(n)]


def mixed_params(n, seed):
    """Greedy and seeded sampling, different lengths: requests finish at different steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        max_tokens = int(rng.integers(1, 14))
        if i % 3 == 0:
            out.append(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        else:
            out.append(SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=max_tokens,
                                      ignore_eos=True, repetition_penalty=1.2 if i % 3 == 1 else 1.0))
    return out


@pytest.mark.slow
def test_20_concurrent_requests_equal_alone_with_chunked_prefill(tiny_checkpoints, alone):
    """20 requests of 3-120 tokens, a 48-token step budget (prompts are prefilled in chunks between
    other requests' decode steps), 8 seats: each output equals the request run alone."""
    llm = make_llm(tiny_checkpoints, max_num_seqs=8, max_num_batched_tokens=48, enable_prefix_caching=False)
    ps, params = random_prompts(20, seed=1), mixed_params(20, seed=1)
    outs = llm.generate(ps, params)
    for p, sp, o in zip(ps, params, outs):
        assert o.outputs[0].token_ids == alone(p, sp)
        assert len(o.outputs[0].token_ids) == sp.max_tokens
    assert llm.engine.allocator.num_used_pages == 0  # every finished request gave its pages back


@pytest.mark.slow
def test_prefix_cache_reuses_shared_prefix_and_changes_nothing(tiny_checkpoints, alone):
    system = np.random.default_rng(7).integers(5, 32768, size=70).tolist()  # a shared "system prompt"
    llm = make_llm(tiny_checkpoints, block_size=16, max_num_batched_tokens=64)
    first = random_prompts(4, seed=2, lo=5, hi=40, prefix=system)
    second = random_prompts(12, seed=3, lo=5, hi=40, prefix=system)
    llm.generate(first, GREEDY)
    stats_before = llm.prefix_cache_stats().cached_tokens
    outs = llm.generate(second, mixed_params(12, seed=3))
    # The 70-token prefix covers 4 full pages of 16: every later request reuses at least 64 tokens.
    assert all(o.num_cached_tokens >= 64 for o in outs)
    assert llm.prefix_cache_stats().cached_tokens - stats_before >= 12 * 64
    for p, sp, o in zip(second, mixed_params(12, seed=3), outs):
        assert o.outputs[0].token_ids == alone(p, sp)
    # The same prompt again is served from the cache up to its last token (which must be computed).
    again = llm.generate([second[0]], GREEDY)[0]
    n = len(second[0]["prompt_token_ids"])
    assert again.num_cached_tokens == (n - 1) // 16 * 16
    assert again.outputs[0].token_ids == alone(second[0], GREEDY)


def test_prefix_cache_off_computes_everything(tiny_checkpoints):
    llm = make_llm(tiny_checkpoints, enable_prefix_caching=False)
    p = random_prompts(1, seed=4, lo=60, hi=61)
    llm.generate(p * 2, GREEDY)
    assert all(o.num_cached_tokens == 0 for o in llm.generate(p, GREEDY))
    assert llm.prefix_cache_stats().cached_tokens == 0


@pytest.mark.slow
def test_preemption_when_pages_run_out_keeps_outputs_exact(tiny_checkpoints, alone):
    """A cache of 24 pages of 8 tokens (192 tokens) for 10 requests needing up to ~60 tokens each:
    the newest running requests are preempted and recomputed, and every output is unchanged."""
    llm = make_llm(tiny_checkpoints, block_size=8, num_pages=25, max_num_seqs=10, max_num_batched_tokens=64,
                   enable_prefix_caching=False)
    ps = random_prompts(10, seed=5, lo=20, hi=48)
    params = mixed_params(10, seed=5)
    params = [dataclasses.replace(sp, max_tokens=12) for sp in params]
    outs = llm.generate(ps, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, sp, o in zip(ps, params, outs):
        assert o.outputs[0].token_ids == alone(p, sp)
    assert llm.engine.allocator.num_used_pages == 0


def test_abort_frees_pages_and_leaves_others_alone(tiny_checkpoints, alone):
    llm = make_llm(tiny_checkpoints, max_num_batched_tokens=64)
    ps = random_prompts(4, seed=6, lo=10, hi=30)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got: dict[str, list[int]] = {}
    aborted = None
    for ev in llm.stream(ps, params):
        got.setdefault(ev.request_id, []).append(ev.token_id)
        if aborted is None and len(got[ev.request_id]) == 3:
            aborted = ev.request_id
            assert llm.abort(aborted)
    assert not llm.abort(aborted)  # already gone
    assert len(got[aborted]) == 3
    rids = sorted(got, key=int)
    for rid, p in zip(rids, ps):
        if rid != aborted:
            assert got[rid] == alone(p, params)
    assert llm.engine.allocator.num_used_pages == 0
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_request_larger_than_the_cache_is_rejected_clearly(tiny_checkpoints):
    llm = make_llm(tiny_checkpoints, block_size=16, num_pages=4)  # 3 usable pages = 48 tokens
    with pytest.raises(ValueError, match="whole cache has 3 pages"):
        llm.generate([{"prompt_token_ids": [1] * 40}], SamplingParams(max_tokens=20))
    assert llm.generate([{"prompt_token_ids": [1] * 30}], SamplingParams(max_tokens=18))  # fits exactly


@pytest.mark.parametrize("kw, match", [
    ({"block_size": 0}, "block_size=0"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens=0"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"num_pages": 1}, "num_pages=1"),
    ({"max_num_seqs": 0}, "max_num_seqs=0"),
    ({"attention_impl": "cuda"}, "attention_impl='cuda'"),
])
def test_bad_engine_settings_fail_clearly(tiny_checkpoints, kw, match):
    with pytest.raises(ValueError, match=match):
        make_llm(tiny_checkpoints, **kw)


def test_cache_sized_from_device_memory_names_the_fix(tiny_checkpoints, monkeypatch):
    from mistral_jax.engine.engine import Engine

    monkeypatch.setattr(Engine, "device_memory", lambda self: {"bytes_limit": 1 << 20, "bytes_in_use": 0})
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        make_llm(tiny_checkpoints)
    monkeypatch.setattr(Engine, "device_memory", lambda self: {"bytes_limit": 8 << 30, "bytes_in_use": 1 << 30})
    llm = make_llm(tiny_checkpoints, gpu_memory_utilization=0.5)
    from mistral_jax.cache.paged import page_bytes

    per_page = page_bytes(llm.config, 16, llm.dtype)
    expected = (0.5 * (8 << 30) - (1 << 30) - llm.engine._activation_bytes()) // per_page
    assert llm.engine.num_pages == expected
