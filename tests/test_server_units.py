"""The server's app in-process, over a scripted engine: its streaming state (chat with tool calls,
completions), usage accounting, request limits, and the end of failed streams, without starting
an engine process or a server subprocess.

FakeEngine stands where the bridge's EngineClient stands (create_app's `bridge`): it checks
requests with the engine's own RequestLimits and answers each with scripted events. FakeTokenizer
spells text one ASCII character per token, with Mistral's [TOOL_CALLS] marker as a token."""

import dataclasses
import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
from starlette.testclient import TestClient

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.engine.request_limits import RequestLimits
from mistral_jax.entrypoints.server.app import create_app
from mistral_jax.entrypoints.server.bridge import EngineClient, EngineStopped, RequestFailed, RequestStream
from mistral_jax.entrypoints.server.chat import ToolCallDeltas
from mistral_jax.entrypoints.server.engine_process import EngineInfo, Stats
from mistral_jax.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from mistral_jax.entrypoints.server.request_params import completion_params, refusal
from mistral_jax.entrypoints.server.usage import Usage
from mistral_jax.tool_calls import ToolCallFormat

BOS, EOS, TOOL_CALLS = 1, 2, 3
VOCAB = 128
CONTEXT = 64
MODEL = "fake"


class FakeCall:
    def __init__(self, id, name, arguments):
        self.id, self.name, self.arguments = id, name, arguments

    def to_openai(self):
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


class FakeTokenizer:
    """Token t >= 32 is chr(t); [TOOL_CALLS] starts calls, a JSON list of {"name", "arguments", "id"}."""

    bos_id, eos_id, vocab_size, stop_token_ids = BOS, EOS, VOCAB, frozenset({EOS})
    SPECIAL = {BOS: "<s>", EOS: "</s>", TOOL_CALLS: "[TOOL_CALLS]"}

    def encode(self, text, add_bos=True):
        return [BOS] * add_bos + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) if t >= 32 else "" if skip_special_tokens else self.SPECIAL.get(t, "") for t in ids)

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(f"{m['role']}:{m.get('content') or ''}\n" for m in messages))

    def __init__(self):  # tool_call_format(tokenizer) finds this format kept on the tokenizer
        self._tool_call_format = self.Format(self)

    class Format(ToolCallFormat):
        def parse(self, token_ids):
            decode = self.tokenizer.decode
            ids = [t for t in token_ids if t != EOS]
            if TOOL_CALLS not in ids:
                return decode(ids), []
            cut = ids.index(TOOL_CALLS)
            try:
                calls = [FakeCall(c["id"], c["name"], c["arguments"]) for c in json.loads(decode(ids[cut + 1:]))]
            except (ValueError, KeyError, TypeError):
                return decode(ids), []
            return decode(ids[:cut]), calls

        def started(self, token_ids):
            return TOOL_CALLS in token_ids


class HeldTokenizer(FakeTokenizer):
    """A format that only tells at the end whether the reply is tool calls (Hermes blocks)."""

    class Format(FakeTokenizer.Format):
        def started(self, token_ids):
            return None


def spell(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeStream:
    """A submitted request's scripted events (a RequestStream's interface); an exception in the
    script is raised where it stands."""

    def __init__(self, engine, request_id, items):
        self.engine, self.request_id, self.items, self.done = engine, request_id, list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done or not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def close(self):
        if not self.done:
            self.engine.aborted.append(self.request_id)
        self.done = True


class FakeEngine:
    """The bridge's interface over scripted replies. reply(ids, params) -> (token ids, finish
    reason, cached tokens), or a list of events and exceptions to send as they are."""

    def __init__(self, reply=None, defaults=None, num_pages=40, page_size=4):
        self.info = SimpleNamespace(model_path="/models/fake", tokenizer_source="unused", tokenizer_mode="auto",
                                    max_model_len=CONTEXT, speculative=False, default_sampling=defaults or {},
                                    limits=RequestLimits(VOCAB, CONTEXT, page_size, num_pages))
        self.stats = SimpleNamespace(running=0, waiting=0, used_pages=0, free_pages=0, num_pages=num_pages,
                                     prompt_tokens=0, cached_tokens=0, spec=(0, 0, 0), programs=0)
        self.observers, self.fault = [], None
        self.reply = reply or (lambda ids, params: (spell("ok"), "stop", 0))
        self.submitted, self.streams, self.aborted = [], [], []

    def check(self, prompt_ids, params, where="the prompt"):
        return self.info.limits.check(prompt_ids, params, where, np.random.default_rng(0))

    def submit(self, prompt_ids, params, arrived=None):
        request_id = f"r{len(self.submitted)}"
        self.submitted.append((prompt_ids, params))
        script = self.reply(prompt_ids, params)
        events = script if isinstance(script, list) else self._events(request_id, prompt_ids, params, *script)
        stream = FakeStream(self, request_id, events)
        self.streams.append(stream)
        return stream

    def _events(self, request_id, ids, params, tokens, finish, cached):
        tokenizer = FakeTokenizer()
        events = []
        for k, t in enumerate(tokens):
            last = k == len(tokens) - 1
            lps = {t: -0.5, 65: -2.0} if params.logprobs is not None else None
            events.append(StepEvent(0, t, tokenizer.decode([t]), lps, last, finish if last else None,
                                    request_id=request_id, num_cached_tokens=cached if last else None,
                                    prompt_logprobs=([None] + [{i: -1.0} for i in ids[1:]]
                                                     if k == 0 and params.prompt_logprobs is not None else None)))
        return events

    def attach(self, loop):
        pass

    def shutdown(self, timeout=5.0):
        pass


def test_the_fakes_keep_the_bridges_interface():
    """The fakes stand in for EngineClient and RequestStream: a change to theirs shows here."""
    fake = FakeEngine()
    assert set(vars(fake.info)) <= {f.name for f in dataclasses.fields(EngineInfo)}
    assert set(vars(fake.stats)) == {f.name for f in dataclasses.fields(Stats)}
    for name in ("check", "submit", "attach", "shutdown"):
        real, ours = inspect.signature(getattr(EngineClient, name)), inspect.signature(getattr(FakeEngine, name))
        assert list(real.parameters) == list(ours.parameters), name
    for name in ("__aiter__", "__anext__", "close"):
        assert callable(getattr(RequestStream, name)) and callable(getattr(FakeStream, name))


def client_for(engine, tokenizer=None):
    # No `with`: the app's lifespan (the tokenizer worker, the warm-up request) does not run.
    return TestClient(create_app(engine, tokenizer or FakeTokenizer(), MODEL))


def sse_events(response) -> list:
    """The data of each server-sent event; [DONE] as the string "[DONE]"."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def deltas(events, index=0) -> list:
    return [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["index"] == index]


CHAT = [{"role": "user", "content": "weather?"}]
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
CALL = '[{"name": "get", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'


# ---- tool-call streaming ---------------------------------------------------------------------


def test_streamed_tool_calls_follow_the_text_before_them():
    engine = FakeEngine(lambda ids, p: (spell("Hi") + [TOOL_CALLS] + spell(CALL) + [EOS], "stop", 0))
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True, "stream_options": {"include_usage": True}}))
    assert got[-1] == "[DONE]"
    assert deltas(got) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "H"}, None), ({"content": "i"}, None),  # the text streams until [TOOL_CALLS]...
        ({"tool_calls": [{"index": 0, "id": "abcDEF123", "type": "function",  # ... then nothing until the end
                          "function": {"name": "get", "arguments": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}, None),
        ({}, "tool_calls"),
    ]
    usage = got[-2]["usage"]
    assert got[-2]["choices"] == [] and usage["completion_tokens"] == 3 + len(CALL) + 1
    assert usage["prompt_tokens"] == len(engine.submitted[0][0])
    assert all(e["object"] == "chat.completion.chunk" for e in got[:-1])


def test_a_format_that_tells_only_at_the_end_holds_the_reply():
    engine = FakeEngine(lambda ids, p: (spell("Hi") + [TOOL_CALLS] + spell(CALL) + [EOS], "stop", 0))
    got = sse_events(client_for(engine, HeldTokenizer()).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert [d for d, _ in deltas(got)][:2] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert [f for _, f in deltas(got)] == [None, None, None, None, "tool_calls"]

    engine = FakeEngine(lambda ids, p: (spell("no call") + [EOS], "stop", 0))
    got = sse_events(client_for(engine, HeldTokenizer()).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert deltas(got) == [({"role": "assistant", "content": ""}, None), ({"content": "no call"}, "stop")]


def test_a_reply_without_calls_streams_as_text_and_a_malformed_call_ends_as_text():
    engine = FakeEngine(lambda ids, p: (spell("abc"), "length", 0))
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert deltas(got)[1:] == [({"content": "a"}, None), ({"content": "b"}, None), ({"content": "c"}, "length")]

    engine = FakeEngine(lambda ids, p: (spell("a") + [TOOL_CALLS] + spell("[{oops"), "length", 0))
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert deltas(got)[1:] == [({"content": "a"}, None), ({"content": "[{oops"}, "length")]


def test_tool_call_deltas_state():
    def event(t, finished=False):
        return StepEvent(0, t, FakeTokenizer().decode([t]), None, finished, "stop" if finished else None)

    state = ToolCallDeltas(FakeTokenizer())
    assert state.step(event(ord("x")), {"lp": 1}) == [({"content": "x"}, None, {"lp": 1})]
    assert (state.sent, state.in_calls) == (1, False)
    assert state.step(event(TOOL_CALLS), None) == [] and state.in_calls
    for t in spell(CALL):
        assert state.step(event(t), None) == []
    end = state.step(event(EOS, finished=True), None)
    assert end[0][0]["tool_calls"][0]["function"]["name"] == "get"
    assert end[-1] == ({}, "tool_calls", None) and len(end) == 3  # no content again: "x" went out already


def test_a_whole_reply_with_tool_calls():
    engine = FakeEngine(lambda ids, p: (spell("Hi") + [TOOL_CALLS] + spell(CALL) + [EOS], "stop", 2))
    body = client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS}).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Hi"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"city": "Paris"}'}
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    # tool_choice "none": the template sees no tools and the reply is plain text
    body = client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS,
                                                                "tool_choice": "none"}).json()
    assert body["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in body["choices"][0]["message"]


# ---- usage -----------------------------------------------------------------------------------


def test_usage_counts_each_prompt_once_however_many_choices():
    engine = FakeEngine(lambda ids, p: (spell("abcd")[: 1 + len(ids) % 3], "length", len(ids) // 2))
    client = client_for(engine)
    body = {"prompt": ["hello", "hi"], "n": 3, "max_tokens": 8}
    whole = client.post("/v1/completions", json=body).json()
    streamed = sse_events(client.post("/v1/completions", json=dict(body, stream=True,
                                                                   stream_options={"include_usage": True})))
    prompts = [len("hello") + 1, len("hi") + 1]
    generated = sum(3 * (1 + n % 3) for n in prompts)
    want = {"prompt_tokens": sum(prompts), "completion_tokens": generated, "total_tokens": sum(prompts) + generated,
            "prompt_tokens_details": {"cached_tokens": sum(n // 2 for n in prompts)}}
    assert whole["usage"] == want
    assert streamed[-2]["usage"] == want and streamed[-1] == "[DONE]"
    assert sorted(c["index"] for c in whole["choices"]) == list(range(6))
    assert not any(e.get("usage") for e in streamed[:-2])  # usage only in the last chunk


def test_usage_without_include_usage_and_for_chat_choices():
    client = client_for(FakeEngine(lambda ids, p: (spell("xy"), "stop", 1)))
    got = sse_events(client.post("/v1/chat/completions", json={"messages": CHAT, "n": 2, "stream": True}))
    assert got[-1] == "[DONE]" and all("usage" not in e for e in got[:-1])
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 2}).json()
    prompt = len(FakeTokenizer().encode_chat(CHAT))
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_usage_unit():
    usage = Usage(n=2)
    for index in (0, 1, 0, 1):
        usage.add_event(index, [1, 2, 3], StepEvent(0, 5, "x", None))
    usage.add_event(1, [1, 2, 3], StepEvent(0, 5, "x", None, True, "stop", num_cached_tokens=3))  # not choice 0
    usage.add_event(2, [1, 2], StepEvent(0, 5, "x", None, True, "stop", num_cached_tokens=2))
    assert usage.body() == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,
                            "prompt_tokens_details": {"cached_tokens": 2}}


def test_echo_with_max_tokens_0_scores_the_prompt():
    engine = FakeEngine(lambda ids, p: (spell("z"), "length", 0))
    client = client_for(engine)
    body = {"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()
    ((_, params),) = engine.submitted
    assert (params.max_tokens, params.prompt_logprobs) == (1, 1)
    (choice,) = whole["choices"]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [None, -1.0, -1.0, -1.0]
    assert choice["logprobs"]["tokens"] == ["<s>", "a", "b", "c"] and choice["logprobs"]["text_offset"] == [0, 3, 4, 5]
    assert whole["usage"]["completion_tokens"] == 0 and whole["usage"]["prompt_tokens"] == 4
    streamed = sse_events(client.post("/v1/completions", json=dict(body, stream=True)))
    assert [e["choices"][0]["text"] for e in streamed[:-1]] == ["abc"]


# ---- request limits: 400s naming the field, before the engine sees the request ----------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only scores, with echo
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),  # past the context
    ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT - 2}, "max_tokens"),  # 3 + 62 > 64
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -(10**30)}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 10**9},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": [VOCAB]}, None),  # a 400 naming the token ids
    ("/v1/completions", {"prompt": "x" * CONTEXT}, None),  # past the context
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),  # needs tools
    ("/v1/completions", {"prompt": "hi", "model": "other"}, "model"),
])
def test_request_limits_are_400s_naming_the_field(path, body, param):
    engine = FakeEngine()
    r = client_for(engine).post(path, json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param, error
    assert engine.submitted == []


def test_the_cache_bounds_a_request():
    engine = FakeEngine(num_pages=5, page_size=4)  # 4 usable pages: 16 tokens
    r = client_for(engine).post("/v1/completions", json={"prompt": "hello", "max_tokens": 11})
    assert r.status_code == 400 and "pages" in r.json()["error"]["message"], r.text
    assert client_for(engine).post("/v1/completions", json={"prompt": "hello", "max_tokens": 10}).status_code == 200


def test_refusals_name_the_request_field_behind_samplingparams():
    chat = ChatCompletionRequest(messages=CHAT, max_completion_tokens=0)
    bad = refusal(ValueError("SamplingParams.max_tokens=0 is invalid: allowed is ..."), chat)
    assert bad.param == "max_completion_tokens" and bad.message.startswith("max_completion_tokens: SamplingParams")
    completion = CompletionRequest(prompt="hi", echo=True, logprobs=3)
    assert refusal(ValueError("SamplingParams.prompt_logprobs=30 is invalid"), completion).param == "logprobs"
    too_long = ValueError("prompt 0 has 3 tokens and asks for max_tokens=99: ...")  # RequestLimits' words
    assert refusal(too_long, completion).param == "max_tokens"
    assert refusal(ValueError("prompt 0 is empty"), completion).param is None


def test_max_tokens_defaults_and_choices_seeds():
    engine = FakeEngine(defaults={"max_tokens": 5, "temperature": 0.5})
    client = client_for(engine)
    assert client.post("/v1/completions", json={"prompt": "hi", "n": 3, "seed": 7}).status_code == 200
    assert [(p.max_tokens, p.temperature, p.seed) for _, p in engine.submitted] == [(5, 0.5, 7), (5, 0.5, 8),
                                                                                    (5, 0.5, 9)]
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 16}).status_code == 200
    assert engine.submitted[-1][1].max_tokens == 16  # sent: the request's own, even at the field's default
    assert client.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 200
    assert engine.submitted[-1][1].max_tokens == 5
    params, score_only = completion_params(CompletionRequest(prompt="hi"), {})
    assert (params.max_tokens, score_only) == (16, False)


# ---- failures and aborts ---------------------------------------------------------------------


def test_a_stream_that_fails_midway_closes_its_open_choices():
    def reply(ids, params):
        first = StepEvent(0, ord("a"), "a", None)
        if params.seed % 2 == 0:  # the first choice finishes; the second fails
            return [first, StepEvent(0, ord("b"), "b", None, True, "stop")]
        return [first, RequestFailed("a step failed", 500)]

    engine = FakeEngine(reply)
    got = sse_events(client_for(engine).post("/v1/completions", json={"prompt": "hi", "n": 2, "seed": 0,
                                                                      "stream": True}))
    closing = [e for e in got[:-1] if "choices" in e and e["choices"][0]["finish_reason"] == "error"]
    assert [e["choices"][0]["index"] for e in closing] == [1]
    assert got[-2]["error"]["code"] == 500 and got[-2]["error"]["type"] == "server_error"
    assert got[-1] == "[DONE]"
    assert all(s.done for s in engine.streams)

    engine = FakeEngine(lambda ids, p: [StepEvent(0, ord("a"), "a", None), EngineStopped("the engine stopped")])
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, "stream": True}))
    assert deltas(got)[-1] == ({}, "error") and got[-2]["error"]["code"] == 503


def test_a_failed_whole_response_is_an_error_status():
    engine = FakeEngine(lambda ids, p: [EngineStopped("the engine stopped")])
    r = client_for(engine).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    engine = FakeEngine(lambda ids, p: [RequestFailed("the engine did not take the request: no", 400)])
    r = client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert all(s.done for s in engine.streams)  # the other choice: aborted


def test_plain_routes():
    engine = FakeEngine()
    client = client_for(engine)
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.post("/tokenize", json={"prompt": "ab"}).json() == {"tokens": [BOS, 97, 98], "count": 3,
                                                                      "max_model_len": CONTEXT}
    assert client.post("/detokenize", json={"tokens": [97, 98]}).json() == {"prompt": "ab"}
    assert client.post("/detokenize", json={"tokens": [VOCAB]}).json()["error"]["param"] == "tokens"
    assert b"mistral_jax:num_requests_running" in client.get("/metrics").content
    engine.fault = "the engine process exited"
    r = client.get("/health")
    assert r.status_code == 503 and "exited" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
