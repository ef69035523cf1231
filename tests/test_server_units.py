"""The server's app in-process, over a scripted engine: its streaming state (chat with tool calls,
completions), usage accounting, request limits, and the end of failed streams, without starting
an engine process or a server subprocess.

FakeEngine stands where the bridge's EngineClient stands (create_app's `bridge`): it checks
requests with the engine's own RequestLimits and answers each with scripted events. FakeTokenizer
spells text one ASCII character per token, with Mistral's [TOOL_CALLS] marker as a token."""

import asyncio
import contextlib
import dataclasses
import gc
import http.client
import inspect
import json
import logging
import threading
import time
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
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.events import collect_unless_disconnected
from mistral_jax.entrypoints.server.inputs import (
    as_legacy_function_call,
    chat_messages,
    mistral_id,
    with_legacy_functions,
)
from mistral_jax.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from mistral_jax.entrypoints.server.request_params import completion_params, refusal
from mistral_jax.entrypoints.server.usage import Usage

BOS, EOS, TOOL_CALLS = 1, 2, 3
VOCAB = 128
CONTEXT = 64
MODEL = "fake"


class FakeTokenizer:
    """Token t >= 32 is chr(t); [TOOL_CALLS] starts calls, a JSON list of {"name", "arguments", "id"}
    (Mistral's v2-v7 format, read by the real MistralToolCalls)."""

    bos_id, eos_id, vocab_size, stop_token_ids = BOS, EOS, VOCAB, frozenset({EOS})
    SPECIAL = {BOS: "<s>", EOS: "</s>", TOOL_CALLS: "[TOOL_CALLS]"}
    tool_call_parser = "mistral"

    def encode(self, text, add_bos=True):
        return [BOS] * add_bos + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(t) if t >= 32 else "" if skip_special_tokens else self.SPECIAL.get(t, "") for t in ids)

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(f"{m['role']}:{m.get('content') or ''}\n" for m in messages))

    def special_id(self, token):
        return {"[TOOL_CALLS]": TOOL_CALLS}.get(token)


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
    chunks = deltas(got)
    assert chunks[:3] == [({"role": "assistant", "content": ""}, None), ({"content": "H"}, None),
                          ({"content": "i"}, None)]
    (head, _), *args, last = chunks[3:]  # the text streams until [TOOL_CALLS], then the call as it comes
    (call,) = head["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "get", "arguments": ""} and len(call["id"]) == 9
    assert [d["tool_calls"][0]["function"]["arguments"] for d, _ in args] == list('{"city": "Paris"}')  # a token each
    assert last == ({}, "tool_calls")
    usage = got[-2]["usage"]
    assert got[-2]["choices"] == [] and usage["completion_tokens"] == 3 + len(CALL) + 1
    assert usage["prompt_tokens"] == len(engine.submitted[0][0])
    assert all(e["object"] == "chat.completion.chunk" for e in got[:-1])


def test_a_reply_without_calls_streams_as_text_and_a_malformed_call_ends_as_text():
    engine = FakeEngine(lambda ids, p: (spell("abc"), "length", 0))
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert deltas(got)[1:] == [({"content": "a"}, None), ({"content": "b"}, None), ({"content": "c"}, "length")]

    # held from [TOOL_CALLS] until it is clearly no call ("o" is no JSON key), then text as it comes
    engine = FakeEngine(lambda ids, p: (spell("a") + [TOOL_CALLS] + spell("[{oops"), "length", 0))
    got = sse_events(client_for(engine).post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True}))
    assert deltas(got)[1:] == [({"content": "a"}, None), ({"content": "[{o"}, None), ({"content": "o"}, None),
                               ({"content": "p"}, None), ({"content": "s"}, "length")]


def test_tool_call_deltas_state():
    def event(t, finished=False):
        return StepEvent(0, t, FakeTokenizer().decode([t]), None, finished, "stop" if finished else None)

    state = ToolCallDeltas(FakeTokenizer())
    assert state.step(event(ord("x")), {"lp": 1}) == [({"content": "x"}, None, {"lp": 1})]
    assert state.step(event(TOOL_CALLS), None) == []
    out = [d for t in spell(CALL) for d in state.step(event(t), None)]
    assert out[0][0]["tool_calls"][0]["function"]["name"] == "get" and (state.begun, state.completed) == (1, 1)
    assert state.step(event(EOS, finished=True), None) == [({}, "tool_calls", None)]


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


# ---- request ids and faults of ours ----------------------------------------------------------


@contextlib.contextmanager
def served(app):
    """The app behind a real uvicorn server on a loopback port, in a thread: real connections
    (keep-alive), and uvicorn's own logging left to the root logger (caplog sees it)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                           log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_fault_of_ours_is_a_500_with_a_request_id_logged_once_and_the_connection_serves_on(caplog):
    def reply(ids, params):
        raise ZeroDivisionError("a bug")

    caplog.set_level(logging.INFO)
    with served(create_app(FakeEngine(reply), FakeTokenizer(), MODEL)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi"}), {"content-type": "application/json"})
        r = conn.getresponse()
        error = json.loads(r.read())["error"]
        rid = r.getheader("x-request-id")
        sock = conn.sock
        assert r.status == 500 and error["type"] == "server_error" and error["code"] == 500
        assert rid.startswith("req-") and rid in error["message"] and "ZeroDivisionError" in error["message"]
        conn.request("GET", "/v1/models")  # the same connection: kept open, and the server serves on
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == MODEL
        assert conn.sock is sock and r.getheader("x-request-id") != rid
        conn.close()
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1, [rec.getMessage() for rec in tracebacks]  # ours, not uvicorn's too
    assert rid in tracebacks[0].getMessage() and tracebacks[0].exc_info[0] is ZeroDivisionError
    assert sum(rid in rec.getMessage() for rec in caplog.records) == 1


def test_a_stream_that_faults_midway_ends_with_an_error_event():
    engine = FakeEngine(lambda ids, p: [StepEvent(0, ord("a"), "a", None), KeyError("a bug")])
    r = client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, "stream": True},
                                headers={"X-Request-Id": "client-7"})
    got = sse_events(r)
    assert r.headers["x-request-id"] == "client-7"
    assert deltas(got)[1] == ({"content": "a"}, None)
    assert got[-2]["error"]["type"] == "server_error" and "client-7" in got[-2]["error"]["message"]
    assert got[-1] == "[DONE]" and all(s.done for s in engine.streams)


def test_every_response_carries_its_request_id():
    client = TestClient(create_app(FakeEngine(), FakeTokenizer(), MODEL, api_key="k"))
    refused = client.get("/v1/models")  # the guard's 401: the id is given before the guard runs
    assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req-")
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert client.get("/health", headers={"X-Request-Id": "trace-42"}).headers["x-request-id"] == "trace-42"
    for unusable in ("has space", "x" * 200, "é"):  # not echoed into a header and the log as sent
        assert client.get("/health", headers={"X-Request-Id": unusable.encode()}).headers[
            "x-request-id"].startswith("req-")


class HangingStream(FakeStream):
    """A request whose generation never ends (the engine is busy)."""

    async def __anext__(self):
        await asyncio.get_running_loop().create_future()


def test_a_client_gone_before_its_response_aborts_its_request_in_one_log_line(caplog):
    engine = FakeEngine()
    streams = [(i, HangingStream(engine, f"r{i}", [])) for i in range(3)]

    async def disconnected():
        return True

    request = SimpleNamespace(is_disconnected=disconnected, state=SimpleNamespace(request_id="req-gone"))
    loop_errors = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        status = None
        try:
            await collect_unless_disconnected(request, streams)
        except BadRequest as e:  # not kept: its traceback would keep the handler's futures alive
            status = e.status
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()  # a future whose exception nobody read reports it when collected
        await asyncio.sleep(0)
        return status

    caplog.set_level(logging.INFO, logger="mistral_jax.server")
    assert asyncio.run(run()) == 499 and sorted(engine.aborted) == ["r0", "r1", "r2"]
    assert loop_errors == []  # no "exception was never retrieved" CancelledError traceback
    (line,) = [rec for rec in caplog.records if rec.name == "mistral_jax.server"]
    assert line.levelno == logging.INFO and "req-gone" in line.getMessage() and not line.exc_info


# ---- OpenAI's deprecated functions / function_call ---------------------------------------------


FUNCTIONS = [{"name": "get", "parameters": {"type": "object"}}]


def test_legacy_functions_read_as_tools():
    legacy = with_legacy_functions(ChatCompletionRequest(messages=CHAT, functions=FUNCTIONS,
                                                         function_call={"name": "get"}))
    assert legacy.tools == [{"type": "function", "function": FUNCTIONS[0]}]
    assert legacy.tool_choice == {"type": "function", "function": {"name": "get"}}
    assert legacy.functions == FUNCTIONS  # kept: the response answers in the legacy shape
    for call in ("none", "auto"):
        assert with_legacy_functions(ChatCompletionRequest(messages=CHAT, functions=FUNCTIONS,
                                                           function_call=call)).tool_choice == call
    plain = ChatCompletionRequest(messages=CHAT, tools=TOOLS)
    assert with_legacy_functions(plain) is plain


@pytest.mark.parametrize("body, param", [
    ({"functions": FUNCTIONS, "tools": TOOLS}, "functions"),
    ({"functions": FUNCTIONS, "function_call": "auto", "tool_choice": "auto"}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": "required"}, "function_call"),  # not a legacy value
    ({"functions": FUNCTIONS, "function_call": {"nam": "get"}}, "function_call"),
    ({"functions": [{"parameters": {}}]}, "functions"),
    ({"functions": FUNCTIONS, "function_call": {"name": "other"}}, "tool_choice"),  # checked as tool_choice
])
def test_legacy_functions_refusals_name_the_field(body, param):
    engine = FakeEngine()
    r = client_for(engine).post("/v1/chat/completions", json={"messages": CHAT, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert engine.submitted == []


class ToolsSeen(FakeTokenizer):
    """Keeps the tools the chat template was given."""

    def encode_chat(self, messages, tools=None):
        self.tools = tools
        return super().encode_chat(messages, tools)


def test_legacy_functions_reach_the_template_and_none_hides_them():
    tokenizer = ToolsSeen()
    client = client_for(FakeEngine(), tokenizer)
    client.post("/v1/chat/completions", json={"messages": CHAT, "functions": FUNCTIONS})
    assert tokenizer.tools == [{"type": "function", "function": FUNCTIONS[0]}]
    client.post("/v1/chat/completions", json={"messages": CHAT, "functions": FUNCTIONS, "function_call": "none"})
    assert tokenizer.tools is None


def test_a_reply_to_legacy_functions_in_their_shape():
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}}
    message = {"role": "assistant", "content": None, "tool_calls": [call, dict(call, id="xyzXYZ789")]}
    assert as_legacy_function_call(message, "tool_calls") == (
        {"role": "assistant", "content": None, "function_call": {"name": "get", "arguments": '{"city": "Paris"}'}},
        "function_call")
    text = {"role": "assistant", "content": "sunny"}
    assert as_legacy_function_call(text, "stop") == (text, "stop")


def test_a_legacy_conversation_pairs_each_function_result_with_its_call():
    messages = chat_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get", "content": "sunny"},
        {"role": "assistant", "content": None, "function_call": {"name": "get", "arguments": '{"city": "Rome"}'}},
        {"role": "function", "name": "get", "content": "rain"},
        {"role": "assistant", "content": "Sunny, then rain.", "function_call": None},  # as clients echo it
    ])
    calls = [m["tool_calls"][0] for m in messages if m["role"] == "assistant" and "tool_calls" in m]
    results = [m for m in messages if m["role"] == "tool"]
    assert [c["function"]["arguments"] for c in calls] == ['{"city": "Paris"}', '{"city": "Rome"}']
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]  # each result answers its call
    assert calls[0]["id"] != calls[1]["id"] and all(mistral_id(c["id"]) == c["id"] for c in calls)
    assert [r["content"] for r in results] == ["sunny", "rain"]
    assert all("function_call" not in m for m in messages) and messages[-1]["content"] == "Sunny, then rain."


# ---- /tokenizer_info, as lm-eval's remote tokenizer reads it -----------------------------------


def remote_tokenizer(client) -> dict:
    """What lm-eval's RemoteTokenizer (tokenizer_backend="remote") learns from a server: the
    special tokens' names from /tokenizer_info, their ids from /tokenize (the first id of the
    name, without special tokens added), text back from /detokenize."""
    info = client.get("/tokenizer_info").json()
    assert "eos_token" in info  # lm-eval's check_remote_tokenizer_support requires it

    def encode(text):
        return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    return {"info": info, "eos_token_id": encode(info["eos_token"])[0], "bos_token_id": encode(info["bos_token"])[0],
            "round_trip": client.post("/detokenize", json={"tokens": encode("Hello world")}).json()["prompt"]}


def test_tokenizer_info_as_lm_eval_reads_it():
    got = remote_tokenizer(client_for(FakeEngine()))
    assert got["info"] == {"tokenizer_class": "FakeTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                           "add_bos_token": True, "model_max_length": CONTEXT, "vocab_size": VOCAB}
    assert (got["bos_token_id"], got["eos_token_id"], got["round_trip"]) == (BOS, EOS, "Hello world")


def test_tokenizer_info_of_a_mistral_tokenizer_gives_its_special_ids():
    # mistral-common reads "</s>" in a text as plain text; /tokenize still gives a lone name its id.
    from mistral_jax.tokenizer import MistralTokenizer

    from helpers.models import v3_tokenizer

    tokenizer = MistralTokenizer(v3_tokenizer())
    engine = FakeEngine()
    engine.info.limits = RequestLimits(tokenizer.vocab_size, CONTEXT, 4, 40)  # /detokenize checks ids against it
    client = client_for(engine, tokenizer)
    got = remote_tokenizer(client)
    assert got["info"]["tokenizer_class"] == "MistralTokenizer" and "chat_template" not in got["info"]
    assert (got["bos_token_id"], got["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert got["round_trip"] == "Hello world"
    with_bos = client.post("/tokenize", json={"prompt": "</s>"}).json()["tokens"]
    assert with_bos == [tokenizer.bos_id, tokenizer.eos_id]
    in_text = client.post("/tokenize", json={"prompt": "a</s>", "add_special_tokens": False}).json()["tokens"]
    assert tokenizer.eos_id not in in_text  # inside a text it stays text, as in a completion's prompt
