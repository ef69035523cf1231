"""Warm-up (issue 23): after LLM(warmup=True), no request compiles anything, whatever it hits in
the prefix cache, however it is batched, preempted or aborted, whatever its sampling settings."""

import numpy as np
import pytest
from test_engine import LOWERINGS, CountEvents

from mistral_jax import LLM, SamplingParams

pytestmark = pytest.mark.slow  # its module fixture warms up every program: ~30 s of CPU

BLOCK = 16


COMPILES = CountEvents("/jax/core/compile/backend_compile_duration")  # a persistent-cache hit is not one


@pytest.fixture(scope="module")
def warm(tiny_checkpoints):
    # A cache of 40 pages (624 tokens) for up to 8 sequences of up to 256 tokens: full batches preempt.
    llm = LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, max_num_seqs=8,
              max_num_batched_tokens=64, block_size=BLOCK, num_pages=40, progress=False, warmup=True)
    return llm


def ids(rng, n):
    return rng.integers(5, 32768, size=n).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
MIX = [GREEDY,
       SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=3, max_tokens=9, ignore_eos=True, logprobs=3),
       SamplingParams(temperature=1.1, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4,
                      frequency_penalty=0.2, max_tokens=8, ignore_eos=True, seed=4),
       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, prompt_logprobs=2),
       SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, logprobs=20, prompt_logprobs=0)]


def test_warmup_compiles_the_known_program_set(warm):
    # token buckets 1..64 (7) x (step, prompt logprobs) + top logprobs per sequence bucket (1, 2,
    # 4, 8: max_num_seqs 8) + the penalty-row reset (whether each compiled here or was already in
    # this test process's jit caches: the next test counts)
    assert warm.warmup_programs == warm.engine.programs() == 7 * 2 + 4 + 1 and warm.warmup_seconds > 0


def test_scripted_session_compiles_nothing(warm):
    llm = warm
    rng = np.random.default_rng(0)
    lowerings, compiles = LOWERINGS.count, COMPILES.count
    fresh = [{"prompt_token_ids": ids(rng, n)} for n in (5, 17, 33, 60, 64, 90)]
    llm.generate(fresh, GREEDY)  # fresh prompts, chunked prefill (64 tokens per step)
    again = llm.generate(fresh, GREEDY)  # the same prompts: whole-prompt hits, last token recomputed
    assert sum(o.num_cached_tokens for o in again) > 0
    system = ids(rng, 3 * BLOCK + 5)  # a shared system prompt, different questions
    llm.generate([{"prompt_token_ids": system + ids(rng, n)} for n in (4, 9, 30)], MIX[:3])
    edges = [{"prompt_token_ids": ids(rng, n)} for n in (2 * BLOCK, 3 * BLOCK, 2 * BLOCK + 7, BLOCK - 1)]
    llm.generate(edges, GREEDY)  # prompts ending on a page boundary and mid-page
    llm.generate(edges, GREEDY)  # ... found whole in the prefix cache
    llm.generate(edges[:1], GREEDY)  # a single request
    big = [{"prompt_token_ids": ids(rng, 100 + 10 * i)} for i in range(8)]  # 8 x ~150 tokens > 40 pages: preempts
    preempted = llm.engine.scheduler.num_preemptions
    outs = llm.generate(big, [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 8)
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.engine.scheduler.num_preemptions > preempted
    stream = llm.stream(fresh[:4], MIX[1])  # abort mid-run
    first = next(stream)
    llm.abort(first.request_id)
    for _ in stream:
        pass
    llm.generate([{"prompt_token_ids": ids(rng, n)} for n in (7, 21, 40, 3, 64)], MIX)  # every setting mixed
    llm.generate([{"prompt_token_ids": ids(rng, 30)}], MIX[3])  # prompt logprobs alone
    from mistral_jax.sample.structured import StructuredOutputs  # grammar masks are data, never a program

    json_row = SamplingParams(temperature=0.8, seed=5, max_tokens=12,
                              structured_outputs=StructuredOutputs(json={"type": "object"}))
    llm.generate([{"prompt_token_ids": ids(rng, n)} for n in (9, 33)], [json_row, GREEDY])
    llm.generate([{"prompt_token_ids": ids(rng, 12)}], json_row)
    assert (LOWERINGS.count - lowerings, COMPILES.count - compiles) == (0, 0)


def test_logprobs_at_any_count_come_from_one_program(warm):
    llm = warm
    p = [{"prompt_token_ids": ids(np.random.default_rng(5), 20)}]
    outs = {n: llm.generate(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=n,
                                             prompt_logprobs=n))[0] for n in (0, 1, 5, 20)}
    for n, out in outs.items():
        steps = out.outputs[0].logprobs
        assert all(len(d) in (n, n + 1) and out.outputs[0].token_ids[i] in d for i, d in enumerate(steps))
        assert out.prompt_logprobs[0] is None and all(len(d) in (n, n + 1) for d in out.prompt_logprobs[1:])
    # the top-1 of 20 is the top-1 of 1
    assert [max(d, key=d.get) for d in outs[20].outputs[0].logprobs] == \
           [max(d, key=d.get) for d in outs[1].outputs[0].logprobs]
