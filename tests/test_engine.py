"""The generation engine on the tiny model: batching, stops, logprobs, compile counts, errors."""

import jax
import numpy as np
import pytest
import torch

from mistral_jax import LLM, SamplingParams

from helpers.checkpoints import hf_model_from_dir

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, progress=False)


@pytest.fixture(scope="module")
def hf(tiny_checkpoints):
    return hf_model_from_dir(tiny_checkpoints[1])


def prompts(n, seed=0, lo=3, hi=60):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(5, 32768, size=int(rng.integers(lo, hi))).tolist()} for _ in range(n)]


def test_batch_gives_each_prompts_own_greedy_tokens(llm):
    ps = prompts(5, seed=1)
    together = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ps]
    assert together == alone


def test_text_prompt_and_vllm_output_shape(llm):
    out = llm.generate("Hello world", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt == "Hello world"
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello world", add_bos=True)
    c = out.outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.text == llm.tokenizer.decode(c.token_ids)


def test_stream_concatenates_to_generate(llm):
    p = prompts(1, seed=3)
    full = llm.generate(p, GREEDY)[0].outputs[0]
    events = list(llm.stream(p, GREEDY))
    assert [e.token_id for e in events] == full.token_ids
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finished and not any(e.finished for e in events[:-1])


def test_stop_token_ids_and_stop_strings(llm):
    p = prompts(1, seed=4)
    base = llm.generate(p, GREEDY)[0].outputs[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    # A stop string taken from the middle of the text: output stops right before it.
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "degenerate stop string; change the seed"
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    streamed = "".join(e.text for e in llm.stream(p, SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                                  ignore_eos=True)))
    assert streamed == out.text


def test_logprobs_match_transformers(llm, hf):
    p = prompts(1, seed=5)[0]["prompt_token_ids"]
    out = llm.generate([{"prompt_token_ids": p}],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2))[0]
    gen = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p + gen])).logits[0].double(), -1).numpy()
    for i, (tok, lp) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(p) - 1 + i]
        assert tok in lp and abs(lp[tok] - row[tok]) < 1e-4
        top3 = np.argsort(-row)[:3]
        assert set(top3) <= set(lp) and all(abs(lp[t] - row[t]) < 1e-4 for t in top3)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(ref[len(p) - 1 + i, t] for i, t in enumerate(gen)),
                                                              abs=1e-3)
    plp = out.prompt_logprobs
    assert len(plp) == len(p) and plp[0] is None
    for t in range(1, len(p)):
        row = ref[t - 1]
        assert abs(plp[t][p[t]] - row[p[t]]) < 1e-4
        assert set(np.argsort(-row)[:2]) <= set(plp[t])


@pytest.mark.slow
def test_seeded_sampling_reproducible_across_batches(llm):
    ps = prompts(3, seed=6)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate([ps[1]], sp)[0].outputs[0].token_ids
    mixed = llm.generate(ps, [GREEDY, sp, SamplingParams(temperature=0.7, seed=5, max_tokens=4)])
    assert mixed[1].outputs[0].token_ids == alone
    other = llm.generate([ps[1]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


class CountEvents:
    """Counts one jax.monitoring duration event in the process, e.g. every jaxpr -> MLIR lowering
    (any jit cache miss, whatever function; a persistent-cache hit still lowers first, so it is
    counted too) or every XLA backend compilation."""

    def __init__(self, event: str):
        self.event, self.count = event, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self.event:
            self.count += 1


LOWERINGS = CountEvents("/jax/core/compile/jaxpr_to_mlir_module_duration")


@pytest.mark.slow
def test_no_recompilation_after_warmup(llm):
    """Steady state compiles nothing new, anywhere: after one warm-up, workloads with other
    tokens, other sampling parameters in other rows and other prompt lengths (same totals, so the
    same step buckets) lower no new program."""
    mix = [GREEDY, SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=9, logprobs=2),
           SamplingParams(temperature=1.2, top_p=0.5, min_p=0.1, repetition_penalty=1.3, max_tokens=7,
                          presence_penalty=0.5, frequency_penalty=0.3)]
    lens = [20, 25, 30]

    def workload(seed):
        rng = np.random.default_rng(seed)
        order = rng.permutation(3)
        return ([{"prompt_token_ids": rng.integers(5, 32768, size=lens[i]).tolist()} for i in rng.permutation(3)],
                [mix[i] for i in order])

    llm.generate(*workload(7))  # warm-up
    before = LOWERINGS.count
    for seed in range(8, 12):
        outs = llm.generate(*workload(seed))
        assert sorted(len(o.outputs[0].token_ids) for o in outs) == [7, 9, 12]
    assert LOWERINGS.count == before


@pytest.mark.slow
def test_one_token_program_beside_the_minimum_bucket(llm, tiny_checkpoints, monkeypatch):
    """On an accelerator steps start at 16 tokens, and one sequence's decode (1 token) has a
    program of its own. Simulated on the CPU (its minimum raised to 16): buckets 1, 16, 32, ...;
    warm-up compiles them all, after which one-row decode (bucket 1) and batched steps (16)
    lower nothing new, and give the tokens of the CPU's own buckets."""
    from mistral_jax.engine import buckets

    monkeypatch.setattr(buckets, "MIN_TOKEN_BUCKET_CPU", 16)
    accel = LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, progress=False)
    assert accel.engine.token_buckets()[:3] == [1, 16, 32]
    ps = prompts(3, seed=5)
    want = [[o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)] for batch in (ps[:1], ps)]
    accel.engine.warmup()
    before = LOWERINGS.count
    got = [[o.outputs[0].token_ids for o in accel.generate(batch, GREEDY)] for batch in (ps[:1], ps)]
    assert got == want and LOWERINGS.count == before


@pytest.mark.parametrize("prompt, params, match", [
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ({"prompt_token_ids": [1, 40000]}, SamplingParams(), "outside"),
    ({"prompt_token_ids": [1] * 300}, SamplingParams(), "past the model's context of 256"),
    ({"prompt_token_ids": [1] * 200}, SamplingParams(max_tokens=100), "Lower max_tokens to 56"),
])
def test_bad_requests_fail_clearly_before_work(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], params)


def test_bad_api_use(llm):
    with pytest.raises(ValueError, match="2 prompts but 3 sampling_params"):
        llm.generate(["a", "b"], [GREEDY] * 3)
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate([123])
    with pytest.raises(ValueError, match="dtype"):
        LLM(model="unused", dtype="int4")


@pytest.mark.slow
def test_max_tokens_none_runs_to_context(tiny_checkpoints):
    small = LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=40, progress=False)
    out = small.generate([{"prompt_token_ids": [1] * 30}], SamplingParams(max_tokens=None, temperature=0,
                                                                         ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_chat_with_tools_encodes_like_mistral_common(llm):
    """LLM.chat sends exactly mistral-common's tokens for a system prompt, tools and history."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from helpers.models import V3_TOKENIZER

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Weather in Paris?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), tools=tools)[0]
    ref = MistralTokenizer.from_file(str(V3_TOKENIZER)).encode_chat_completion(
        ChatCompletionRequest.from_openai(messages, tools=tools)).tokens
    assert out.prompt_token_ids == ref
    assert len(out.outputs[0].token_ids) >= 1
