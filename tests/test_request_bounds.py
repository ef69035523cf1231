"""Request bounds (issue 42): every sampling value is either in range or refused where it enters
(SamplingParams, RequestLimits.check, the server's request models) with an error naming its
field, so nothing out of range reaches a step; and an LLM whose step raised keeps working
(Engine.abort_all)."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from mistral_jax import LLM, SamplingParams
from mistral_jax.engine.engine import Engine
from mistral_jax.engine.output_processor import OutputProcessor
from mistral_jax.engine.runner import ModelRunner
from mistral_jax.entrypoints.server.protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from mistral_jax.sample.sampling import (
    INT32_MAX,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingArrays,
    show,
)

PROMPT = [1, 5, 6, 7, 8]
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, progress=False)


@pytest.fixture(scope="module")
def vocab(llm):
    return llm.engine.cfg.vocab_size


def _id(value) -> str:
    """A test id: pytest's own str() of a 5000-digit int raises."""
    return value if isinstance(value, str) else show(value)


def tokens(llm, prompt=PROMPT, **kw):
    """The generated ids of one request (4 tokens, sampled with seed 3 unless kw says)."""
    params = SamplingParams(**{"max_tokens": 4, "ignore_eos": True, "temperature": 1.0, "seed": 3, **kw})
    return llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids


def assert_idle(engine):
    """No step pending, no sequence, every seat free, no page referenced (named pages in the
    LRU, the rest plain free: together every page but the null one)."""
    sched, alloc = engine.scheduler, engine.allocator
    assert engine._pending is None and not engine.sequences and not engine.outputs
    assert not engine.has_unfinished_requests() and not sched.running and not sched.waiting
    assert sorted(sched.free_slots) == list(range(engine.config.max_num_seqs))
    assert alloc.num_used_pages == 0 and not any(alloc.refs)
    assert len(set(alloc.free_list)) + len(alloc.evictable) == alloc.num_pages - 1
    assert not set(alloc.free_list) & set(alloc.evictable) and set(alloc.evictable) <= set(alloc.hash_of)


# ---- SamplingParams and RequestLimits at their extremes ----------------------------------------


def test_top_k_past_the_vocabulary_is_off(llm, vocab):
    """A top_k >= the vocabulary keeps every token: it samples as top_k=0 does, however large
    (2**31 used to overflow the step's int32 array and leave the LLM broken)."""
    off = tokens(llm, top_k=0)
    for k in (vocab, vocab + 1, 2**31 - 1, 2**31, 2**63, 10**30):
        assert tokens(llm, top_k=k) == off, k
    assert len(tokens(llm, top_k=vocab - 1)) == 4 and len(tokens(llm, top_k=1)) == 4
    sp = SamplingParams(top_k=2**31)
    assert llm.engine.check_request(PROMPT, sp, "prompt 0").top_k == 0 and sp.top_k == 2**31  # a copy
    # Packing alone (no RequestLimits) never overflows either: capped to int32.
    assert SamplingArrays.from_params([SamplingParams(top_k=2**63)]).top_k.tolist() == [INT32_MAX]
    assert_idle(llm.engine)


def test_seeds_are_taken_modulo_2_64(llm):
    assert tokens(llm, seed=-1) == tokens(llm, seed=2**64 - 1)
    assert tokens(llm, seed=2**64) == tokens(llm, seed=0)
    assert tokens(llm, seed=2**70 + 5) == tokens(llm, seed=5)
    assert len(tokens(llm, seed=-(2**70))) == 4
    assert SamplingParams(seed=np.uint64(2**64 - 1)).seed == 2**64 - 1  # stored as a Python int


def test_stop_token_ids_are_integers_from_0():
    """Negative ids are refused here; large ones wait for RequestLimits, which knows the vocabulary."""
    for ids in ([-1], [5, -(2**31)], [-(10**5000)], [1.0], 5, "12"):
        with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids=.* allowed is"):
            SamplingParams(stop_token_ids=ids)
    assert SamplingParams(stop_token_ids=(np.int64(3), 2**70)).stop_token_ids == [3, 2**70]


def test_stop_token_ids_within_the_vocabulary(llm, vocab):
    assert len(tokens(llm, stop_token_ids=[vocab - 1, 0])) == 4
    for ids in ([vocab], [2**31], [10**30], [3, 2**63]):
        with pytest.raises(ValueError, match=rf"stop_token_ids has ids outside \[0, {vocab}\)"):
            tokens(llm, stop_token_ids=ids)
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids=5 "):
        SamplingParams(stop_token_ids=5)  # not a list: a ValueError, not list()'s TypeError
    assert_idle(llm.engine)


def test_logit_bias_within_the_vocabulary(llm, vocab):
    """Ids below the vocabulary bias (+100 forces the top id, sampled at temperature 1); ids at or
    past it are refused by RequestLimits naming the field, however large; a key no int can hold
    is refused by SamplingParams."""
    assert tokens(llm, logit_bias={str(vocab - 1): 100, 0: -100}) == [vocab - 1] * 4
    for key in (vocab, str(vocab), 2**31, 2**63, 10**30, "9" * 4000):
        outside = rf"SamplingParams\.logit_bias has token ids outside \[0, {vocab}\)"
        with pytest.raises(ValueError, match=outside) as err:
            tokens(llm, logit_bias={1: 1.0, key: -100})
        assert len(str(err.value)) < 400
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias=.* allowed is") as err:
        SamplingParams(logit_bias={"9" * 5000: -100})  # past Python's 4300 digits
    assert len(str(err.value)) < 400
    assert_idle(llm.engine)


def test_logit_bias_refusals_are_400s_naming_the_field(llm, vocab):
    """The server's one path for logit_bias (its request model types it; SamplingParams, then
    RequestLimits.check through the bridge, check it): each refusal a 400 whose param is
    logit_bias, on completions and chat alike."""
    from mistral_jax.entrypoints.server.errors import BadRequest
    from mistral_jax.entrypoints.server.request_params import admit, chat_params, completion_params

    bridge = SimpleNamespace(check=llm.engine.check_request)
    for bias in ({"5": 101}, {"5": -100.001}, {"x": 1}, {str(t): 1 for t in range(301)}):
        for params, req in ((completion_params, CompletionRequest.model_validate(_completion(logit_bias=bias))),
                            (chat_params, ChatCompletionRequest.model_validate(_chat(logit_bias=bias)))):
            with pytest.raises(BadRequest) as err:
                params(req, {})
            assert err.value.param == "logit_bias" and err.value.status == 400, err.value.message
    req = ChatCompletionRequest.model_validate(_chat(logit_bias={str(vocab): -100}))
    with pytest.raises(BadRequest) as err:
        admit(bridge, PROMPT, chat_params(req, {}), "the prompt", req)
    assert err.value.param == "logit_bias" and "outside" in err.value.message
    req = CompletionRequest.model_validate(_completion(logit_bias={"7": -100, str(vocab - 1): 2.5}))
    assert admit(bridge, PROMPT, completion_params(req, {})[0], "the prompt", req).logit_bias == {7: -100.0,
                                                                                             vocab - 1: 2.5}
    with pytest.raises(ValidationError) as err:  # a type pydantic refuses: its error names the field too
        CompletionRequest.model_validate(_completion(logit_bias={"5": "strong"}))
    assert err.value.errors()[0]["loc"][0] == "logit_bias"


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.0), ("presence_penalty", -2.0), ("frequency_penalty", 2.0), ("frequency_penalty", -2.0),
    ("repetition_penalty", MIN_REPETITION_PENALTY), ("repetition_penalty", MAX_REPETITION_PENALTY),
    ("temperature", MAX_TEMPERATURE), ("temperature", 0), ("top_p", 1e-45), ("min_p", 1.0),
    ("logprobs", MAX_LOGPROBS), ("prompt_logprobs", MAX_LOGPROBS),
])
def test_values_at_their_bounds_generate(llm, field, value):
    assert len(tokens(llm, **{field: value})) == 4


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.0001), ("presence_penalty", -2.5), ("frequency_penalty", 3), ("frequency_penalty", -2.01),
    ("repetition_penalty", 0.0099), ("repetition_penalty", 100.5), ("repetition_penalty", 0),
    ("repetition_penalty", 1e-300), ("temperature", 100.5), ("temperature", 1e300), ("temperature", 10**400),
    ("top_p", 10**400), ("top_k", -(10**5000)),
    ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 10**30), ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("max_tokens", -(10**30)), ("seed", 2.0**70), ("n", 10**9),
    *[(f, v) for f in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
      for v in (float("nan"), float("inf"), float("-inf"), np.float32("nan"))],
], ids=_id)
def test_values_past_their_bounds_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* allowed is") as err:
        SamplingParams(**{field: value})
    assert len(str(err.value)) < 400  # a huge number is not echoed whole


def test_stop_strings_are_bounded():
    assert len(SamplingParams(stop=["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS).stop) == MAX_STOP_STRINGS
    for stop in (["x"] * (MAX_STOP_STRINGS + 1), "x" * (MAX_STOP_LENGTH + 1), ["ok", "y" * (MAX_STOP_LENGTH + 1)], 5):
        with pytest.raises(ValueError, match=r"SamplingParams\.stop="):
            SamplingParams(stop=stop)


def test_huge_max_tokens_is_refused_by_the_context(llm):
    sp = SamplingParams(max_tokens=10**50)  # no bound of its own: the context gives it
    with pytest.raises(ValueError, match=r"max_tokens=~10\*\*50\b.*Lower max_tokens to 251") as err:
        llm.generate([{"prompt_token_ids": PROMPT}], sp)
    assert len(str(err.value)) < 400
    assert_idle(llm.engine)


@pytest.mark.parametrize("ids", [[1, 2**31], [1, -1], [10**30], [1, 2**63, 5]])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(llm, vocab, ids):
    with pytest.raises(ValueError, match=rf"prompt 0 has token ids outside \[0, {vocab}\)"):
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=2))
    assert_idle(llm.engine)


def test_fields_changed_after_construction_are_checked_again(llm):
    """SamplingParams is a mutable dataclass: the engine checks a request's values again when
    it takes it, so a value set later cannot reach a step unchecked."""
    sp = SamplingParams(max_tokens=2)
    sp.temperature = float("nan")
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature=nan"):
        llm.generate([{"prompt_token_ids": PROMPT}], sp)
    sp = SamplingParams(max_tokens=2, seed=1)
    sp.top_k = 2**40
    assert len(llm.generate([{"prompt_token_ids": PROMPT}], sp)[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside"):  # Engine.add_request checks too
        llm.engine.add_request([1, 2**31], SamplingParams())
    assert_idle(llm.engine)


# ---- the server's request models ---------------------------------------------------------------


def _completion(**kw):
    return {"prompt": "hi", **kw}


def _chat(**kw):
    return {"messages": CHAT, **kw}


@pytest.mark.parametrize("model, body, field", [
    (CompletionRequest, _completion(n=10**9), "n"),
    (CompletionRequest, _completion(n=MAX_N + 1), "n"),
    (ChatCompletionRequest, _chat(n=0), "n"),
    (CompletionRequest, _completion(temperature=1e30), "temperature"),
    (CompletionRequest, _completion(temperature=MAX_TEMPERATURE + 1), "temperature"),
    (CompletionRequest, _completion(temperature=10**30), "temperature"),
    (ChatCompletionRequest, _chat(temperature=-0.1), "temperature"),
    (CompletionRequest, _completion(top_p=0), "top_p"),
    (CompletionRequest, _completion(top_p=1.5), "top_p"),
    (CompletionRequest, _completion(top_k=-2), "top_k"),
    (CompletionRequest, _completion(top_k=-(10**30)), "top_k"),
    (CompletionRequest, _completion(min_p=2), "min_p"),
    (CompletionRequest, _completion(seed=2**64), "seed"),
    (CompletionRequest, _completion(seed=-(2**63) - 1), "seed"),
    (ChatCompletionRequest, _chat(seed=10**30), "seed"),
    (CompletionRequest, _completion(repetition_penalty=0), "repetition_penalty"),
    (CompletionRequest, _completion(repetition_penalty=MIN_REPETITION_PENALTY / 2), "repetition_penalty"),
    (CompletionRequest, _completion(repetition_penalty=MAX_REPETITION_PENALTY + 1), "repetition_penalty"),
    (CompletionRequest, _completion(presence_penalty=2.5), "presence_penalty"),
    (ChatCompletionRequest, _chat(frequency_penalty=-3), "frequency_penalty"),
    (CompletionRequest, _completion(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (CompletionRequest, _completion(stop="x" * (MAX_STOP_LENGTH + 1)), "stop"),
    (ChatCompletionRequest, _chat(stop=["ok", "x" * (MAX_STOP_LENGTH + 1)]), "stop"),
    (CompletionRequest, _completion(stop_token_ids=[2, -1]), "stop_token_ids"),
    (CompletionRequest, _completion(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    (CompletionRequest, _completion(logprobs=10**30), "logprobs"),
    (ChatCompletionRequest, _chat(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), "top_logprobs"),
    # max_tokens and max_completion_tokens are not bounded by the models: SamplingParams and
    # RequestLimits.check are their one validation path (tests/test_server_units.py: 400s naming them).
])
def test_request_models_refuse_out_of_range_values_naming_the_field(model, body, field):
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    first = err.value.errors()[0]
    assert first["loc"][0] == field, first
    assert len(str(first["msg"])) < 200, first


@pytest.mark.parametrize("raw, field", [
    (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "hi", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "hi", "n": 1000000000000000000000000000000}', "n"),
    (b'{"prompt": "hi", "seed": -1000000000000000000000000000000}', "seed"),
])
def test_request_models_refuse_extreme_json_naming_the_field(raw, field):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate_json(raw)
    assert err.value.errors()[0]["loc"][0] == field, err.value.errors()


def test_request_models_parse_huge_integers_without_blowing_up():
    """JSON integers of any size parse (or are refused as invalid JSON past pydantic's limit),
    never raising anything but a ValidationError."""
    big = 10**30
    req = CompletionRequest.model_validate_json(
        f'{{"prompt": [{big}], "top_k": {big}, "max_tokens": {big}, "stop_token_ids": [{big}]}}')
    assert req.top_k == big and req.max_tokens == big and req.prompt == [big]
    assert DetokenizeRequest.model_validate({"tokens": [2**31, -1, big]}).tokens == [2**31, -1, big]  # app checks them
    assert TokenizeRequest.model_validate({"prompt": "hi", "add_special_tokens": False}).prompt == "hi"
    for raw in ('{"prompt": "hi", "top_k": %s}', '{"prompt": [%s]}', '{"tokens": [%s]}'):
        with pytest.raises(ValidationError):
            (DetokenizeRequest if "tokens" in raw else CompletionRequest).model_validate_json(raw % ("9" * 5000))


def test_bodies_the_models_accept_build_params_the_engine_takes_or_refuses_clearly(llm, vocab):
    """The models' bounds are SamplingParams' own: values at the models' limits build
    SamplingParams; those only the model can bound are clipped (top_k) or refused naming the
    field by RequestLimits.check (max_tokens, stop_token_ids)."""
    fields = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
              "frequency_penalty", "repetition_penalty")

    def params(**kw):
        req = CompletionRequest.model_validate(_completion(**kw))
        given = {k: getattr(req, k) for k in fields if getattr(req, k) is not None}
        return SamplingParams(max_tokens=req.max_tokens, **given)

    check = lambda sp: llm.engine.check_request(PROMPT, sp, "prompt 0")  # noqa: E731
    edge = params(temperature=MAX_TEMPERATURE, top_k=10**30, seed=2**64 - 1, repetition_penalty=MIN_REPETITION_PENALTY,
                  presence_penalty=-2, stop=["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS, max_tokens=4)
    assert check(edge).top_k == 0
    assert params(seed=-(2**63), repetition_penalty=MAX_REPETITION_PENALTY, top_p=1e-30).seed == -(2**63)
    with pytest.raises(ValueError, match="max_tokens"):
        check(params(max_tokens=10**30))
    with pytest.raises(ValueError, match="stop_token_ids"):
        check(params(stop_token_ids=[vocab, 10**30]))


# ---- recovery after a step raised --------------------------------------------------------------


RECOVERY_PROMPTS = [[1] + list(range(100, 140)), [1] + list(range(300, 333)), [1, 7, 9]]  # full pages: cached
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _greedy(llm):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in RECOVERY_PROMPTS], GREEDY)]


# Where each stage of a step lives: the runner packs and runs it, the engine reads the pending
# step's result, the output processor turns it into events.
STAGES = {"_pack": ModelRunner, "_run_step": ModelRunner, "_read": Engine, "_emit": OutputProcessor}


def _fail_once(monkeypatch, name: str, at_call: int, consume: bool = False):
    """<stage>.<name> raises on its at_call-th call (from the second step on, a step is pending
    then); consume: first delete the buffers a step donates (the runner's), as a program failing
    on the device may."""
    owner = STAGES[name]
    real = getattr(owner, name)
    calls = itertools.count(1)

    def flaky(self, *args, **kwargs):
        if next(calls) == at_call:
            if consume:
                for x in (self.k_pages, self.v_pages, self.counts, self.seen):
                    x.delete()
            raise RuntimeError(f"injected failure in {name}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


@pytest.mark.parametrize("name, at_call, consume", [
    ("_pack", 2, False),  # host packing, after the scheduler moved its state
    ("_pack", 3, False),
    ("_run_step", 2, False),  # at the device program's call
    ("_read", 1, False),  # reading the pending step, after the next one launched
    ("_read", 3, False),
    ("_emit", 5, False),  # midway through a step's events
    ("_run_step", 3, True),  # the device program consumed its donated buffers
])
def test_a_step_that_raises_leaves_the_llm_working(llm, monkeypatch, name, at_call, consume):
    engine = llm.engine
    want = _greedy(llm)
    engine.allocator.reset_prefix_cache()  # the failed run names pages again: those get reused below
    assert_idle(engine)
    _fail_once(monkeypatch, name, at_call, consume)
    with pytest.raises(RuntimeError, match="injected failure"):
        _greedy(llm)
    monkeypatch.undo()
    assert_idle(engine)  # every page back: none leaked by the half-done step
    engine.allocator.reset_stats()
    assert _greedy(llm) == want  # the same LLM, the same greedy tokens...
    assert_idle(engine)
    # ... from the pages the failed run's launched steps cached (none where the buffers were lost)
    assert (engine.allocator.stats.cached_tokens == 0) == consume


def test_a_failing_stream_recovers_and_abort_all_names_what_it_dropped(llm, monkeypatch):
    engine = llm.engine
    want = _greedy(llm)
    _fail_once(monkeypatch, "_read", 2)
    stream = llm.stream([{"prompt_token_ids": p} for p in RECOVERY_PROMPTS], GREEDY)
    with pytest.raises(RuntimeError, match="injected failure"):
        list(stream)
    monkeypatch.undo()
    assert_idle(engine)
    assert _greedy(llm) == want
    # abort_all itself: the requests it drops, then an idle engine; idle, it drops nothing.
    ids = [engine.add_request(p, GREEDY) for p in RECOVERY_PROMPTS]
    engine.step()
    engine.step()
    assert sorted(engine.abort_all()) == sorted(ids)
    assert_idle(engine)
    assert engine.abort_all() == []
    assert _greedy(llm) == want
