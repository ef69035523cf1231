"""Anthropic's Messages API (/v1/messages), judged by the official `anthropic` client: its
`messages.create` parses each response into its types, and `messages.stream` accumulates the
events into a message (it refuses events out of order, and parses each tool_use block's JSON).

- Against `python -m mistral_jax.serve` on the default model (SmolLM2-135M-Instruct, a ChatML
  model whose tool calls are Hermes blocks): text, a system prompt (a string, and text blocks),
  stop sequences and a tool-use round trip (tool_use, then tool_result, then the answer), each
  created whole and streamed, and each compared with the same request through chat completions:
  greedy, the same text and the same call, since both APIs template and sample one way. Bad
  input there is a 4xx in Anthropic's error shape whose message names the field.
- In-process, over test_server_units' scripted engine (the client reaching the app through a
  transport of its own HTTP library): the API key as Anthropic sends it (x-api-key), the events
  of a reply with text and then a call, a call cut off by max_tokens, which stop sequence ended
  a reply, an engine that fails midway (Anthropic's error event), and count_tokens.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import httpx2
import openai
import pytest
from starlette.testclient import TestClient
from test_server_units import EOS, MODEL, TOOL_CALLS, FakeEngine, FakeTokenizer, spell

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server.app import create_app
from mistral_jax.entrypoints.server.bridge import EngineStopped

from helpers.server import default_model_server

NAME = "SmolLM2-135M-Instruct"  # the default model's served name when no --model is given
GREEDY = {"temperature": 0}  # the anthropic client sends sampling fields as extra_body
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_FUNCTION = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                     "parameters": WEATHER["input_schema"]}}


@pytest.fixture(scope="module")
def server():
    """The default model; no warm-up: the few programs these requests need compile on first use."""
    s = default_model_server()
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def streamed(client, **kw):
    """messages.stream: the text as its text_stream yields it, and the message it accumulated."""
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        return text, stream.get_final_message()


def together(*calls):
    """Requests sent at once, so that the engine batches them (the CPU is slow one at a time)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def text_of(message) -> str:
    assert all(b.type == "text" for b in message.content), message.content
    return "".join(b.text for b in message.content)


def check_usage(message, chat):
    """Anthropic's sum: input_tokens + cache_read_input_tokens is the whole prompt."""
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens


# ---- the default model, against chat completions ---------------------------------------------------


@pytest.mark.slow
def test_text_and_stop_sequences_match_chat_completions(claude, oai):
    """One question asked four ways, greedy: whole and streamed, with and without a stop sequence
    that the answer holds. Each reply is the chat completion's text, and stop_reason follows its
    finish_reason ("stop_sequence" naming the sequence where the stop string ended it)."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(model=NAME, max_tokens=24, messages=question, extra_body=GREEDY)
    chat, chat_stop, whole, (text, final), whole_stop, (_, final_stop) = together(
        lambda: oai.chat.completions.create(model=NAME, max_tokens=24, messages=question, temperature=0),
        lambda: oai.chat.completions.create(model=NAME, max_tokens=24, messages=question, temperature=0,
                                            stop=["Paris"]),
        lambda: claude.messages.create(**kw),
        lambda: streamed(claude, **kw),
        lambda: claude.messages.create(**kw, stop_sequences=["Paris"]),
        lambda: streamed(claude, **kw, stop_sequences=["Paris"]))
    answer = chat.choices[0].message.content
    assert "Paris" in answer  # the stop sequence below is in the reply, so it ends it
    assert text_of(whole) == text == text_of(final) == answer
    assert whole.stop_reason == final.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[
        chat.choices[0].finish_reason]
    assert whole.id.startswith("msg_") and whole.model == NAME and whole.role == "assistant"
    check_usage(whole, chat)
    check_usage(final, chat)
    assert chat_stop.choices[0].finish_reason == "stop"
    for m in (whole_stop, final_stop):
        assert text_of(m) == chat_stop.choices[0].message.content == answer[:answer.index("Paris")]
        assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "Paris")


@pytest.mark.slow
def test_system_prompt_matches_chat_completions(claude, oai):
    """`system` as a string is the chat's system message; as text blocks, their texts joined by a
    blank line."""
    system = ["You are a pirate.", "Answer in one sentence."]
    question = [{"role": "user", "content": "Say hello."}]
    kw = dict(model=NAME, max_tokens=20, messages=question, extra_body=GREEDY)
    one, two, whole, (text, _), blocks, no_system = together(
        lambda: oai.chat.completions.create(model=NAME, max_tokens=20, temperature=0,
                                            messages=[{"role": "system", "content": system[0]}, *question]),
        lambda: oai.chat.completions.create(model=NAME, max_tokens=20, temperature=0,
                                            messages=[{"role": "system", "content": "\n\n".join(system)}, *question]),
        lambda: claude.messages.create(**kw, system=system[0]),
        lambda: streamed(claude, **kw, system=system[0]),
        lambda: claude.messages.create(**kw, system=[{"type": "text", "text": s} for s in system]),
        lambda: claude.messages.create(**kw))
    assert text_of(whole) == text == one.choices[0].message.content
    assert text_of(blocks) == two.choices[0].message.content
    assert text_of(no_system) != text_of(whole)  # the system prompt reached the model


@pytest.mark.slow
def test_tool_use_round_trip_matches_chat_completions(claude, oai):
    """A forced call (tool_choice "tool", one call), whole and streamed, is the chat completion's
    call (tool_choice named, parallel_tool_calls false); the assistant's tool_use goes back as the
    SDK returned it, with a tool_result, and the answer is the chat completion's answer to the
    same history in OpenAI's shape."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    forced = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    kw = dict(model=NAME, max_tokens=48, tools=[WEATHER], messages=[question], extra_body=GREEDY)
    chat, whole, (_, final) = together(
        lambda: oai.chat.completions.create(model=NAME, max_tokens=48, temperature=0, messages=[question],
                                            tools=[WEATHER_FUNCTION], parallel_tool_calls=False,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        lambda: claude.messages.create(**kw, tool_choice=forced),
        lambda: streamed(claude, **kw, tool_choice=forced))
    (call,) = chat.choices[0].message.tool_calls
    for m in (whole, final):
        assert m.stop_reason == "tool_use" and chat.choices[0].finish_reason == "tool_calls"
        (block,) = m.content
        assert block.type == "tool_use" and block.id.startswith("toolu_")
        assert (block.name, block.input) == (call.function.name, json.loads(call.function.arguments))
    check_usage(whole, chat)

    weather = json.dumps({"city": block.input["city"], "sky": "sunny", "celsius": 21})
    history = [question, {"role": "assistant", "content": whole.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": whole.content[0].id,
                                             "content": weather}]}]
    chat_history = [question, chat.choices[0].message,
                    {"role": "tool", "tool_call_id": call.id, "content": weather}]
    kw = dict(model=NAME, max_tokens=32, tools=[WEATHER], messages=history, extra_body=GREEDY)
    chat_answer, answer, (text, _) = together(
        lambda: oai.chat.completions.create(model=NAME, max_tokens=32, temperature=0, messages=chat_history,
                                            tools=[WEATHER_FUNCTION]),
        lambda: claude.messages.create(**kw),
        lambda: streamed(claude, **kw))
    assert not chat_answer.choices[0].message.tool_calls and answer.stop_reason in ("end_turn", "max_tokens")
    assert text_of(answer) == text == chat_answer.choices[0].message.content
    assert "21" in text or "sunny" in text.lower()  # the answer read the tool's result


@pytest.mark.slow
@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, "temperature"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["x"] * 100},
     "stop_sequences"),
    ({"max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image", "source": {}}]}]}]},
     "messages.0.content.0.content.0"),
])
def test_bad_input_is_a_400_in_anthropics_shape(server, body, field):
    """Anthropic's error object (type "error", error.type invalid_request_error), its message
    beginning with the request's field, before any work reaches the engine."""
    r = httpx.post(server.url + "/v1/messages", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and set(r.json()) == {"type", "error"}
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith(field), r.json()


@pytest.mark.slow
def test_errors_through_the_client(claude):
    """The anthropic client raises its own error classes, with the body it parsed: a model not
    served is a 404 not_found_error; a bad field a 400 BadRequestError."""
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error" and "model" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=NAME, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                               tool_choice={"type": "any"})
    assert e.value.body["error"]["message"].startswith("tool_choice")


# ---- in-process, over the scripted engine ----------------------------------------------------------


class Via(httpx2.BaseTransport):
    """The anthropic client's HTTP library (httpx2) carried to an app through Starlette's
    TestClient: each request is sent to the app, and its response handed back whole."""

    def __init__(self, app):
        self.client = TestClient(app)

    def handle_request(self, request):
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in ("host", "content-length")]
        r = self.client.request(request.method, str(request.url), headers=headers, content=request.read())
        return httpx2.Response(r.status_code, headers=r.headers.multi_items(), content=r.content)


def client_of(engine, **kw):
    app = create_app(engine, FakeTokenizer(), MODEL, api_key=kw.pop("app_key", None))
    return anthropic.Anthropic(base_url="http://testserver", max_retries=0, **{"api_key": "unused", **kw},
                               http_client=httpx2.Client(transport=Via(app)))


def scripted(tokens, finish="stop"):
    return FakeEngine(lambda ids, params: (tokens, finish, 0))


HI = [{"role": "user", "content": "hi"}]
CALL = spell('[{"name": "f", "arguments": {"a": 1}}]')  # Mistral's v2-v7 calls
TOOL_F = {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}


def test_api_key_as_anthropic_sends_it():
    """With --api-key, /v1/messages takes the key in x-api-key (the client's api_key) or as a
    Bearer token (its auth_token); a wrong one is a 401 authentication_error in Anthropic's
    shape. The OpenAI routes still ask for the Bearer token."""
    engine = scripted(spell("ok") + [EOS])
    for kw in ({"api_key": "secret"}, {"api_key": None, "auth_token": "secret"}):
        assert text_of(client_of(engine, app_key="secret", **kw).messages.create(
            model=MODEL, max_tokens=4, messages=HI)) == "ok"
    with pytest.raises(anthropic.AuthenticationError) as e:
        client_of(engine, app_key="secret", api_key="wrong").messages.create(model=MODEL, max_tokens=4, messages=HI)
    assert e.value.body["type"] == "error" and set(e.value.body["error"]) == {"type", "message"}
    assert e.value.body["error"]["type"] == "authentication_error" and "x-api-key" in e.value.body["error"]["message"]
    chat = TestClient(create_app(engine, FakeTokenizer(), MODEL, api_key="secret")).post(
        "/v1/chat/completions", json={"messages": HI}, headers={"x-api-key": "secret"})
    assert chat.status_code == 401 and chat.json()["error"]["type"] == "authentication_error"


def test_text_then_a_call_whole_and_streamed():
    """Text, then a call: a text block and a tool_use block in that order, whole and as the
    stream accumulates it; the events are the ones Anthropic sends, each block started, filled
    and stopped in turn."""
    engine = scripted(spell("Let me see.") + [TOOL_CALLS] + CALL + [EOS])
    client = client_of(engine)
    kw = dict(model=MODEL, max_tokens=50, messages=HI, tools=[TOOL_F])
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    for m in (whole, final):
        assert [b.type for b in m.content] == ["text", "tool_use"]
        assert m.content[0].text == "Let me see."
        assert (m.content[1].name, m.content[1].input) == ("f", {"a": 1}) and m.content[1].id.startswith("toolu_")
        assert m.stop_reason == "tool_use" and m.stop_sequence is None
        assert (m.usage.input_tokens, m.usage.output_tokens) == (whole.usage.input_tokens, len(CALL) + 13)
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    blocks = [e for e in events if e.startswith("content_block_") and e != "content_block_delta"]
    assert blocks == ["content_block_start", "content_block_stop"] * 2


def test_a_call_cut_off_by_max_tokens():
    """A call that max_tokens cut off is not in the whole reply (its arguments are not whole);
    streamed, its block went out before the cut showed. stop_reason is max_tokens either way."""
    client = client_of(scripted(spell("Hm") + [TOOL_CALLS] + CALL[:-5], "length"))  # inside the arguments
    kw = dict(model=MODEL, max_tokens=15, messages=HI, tools=[TOOL_F])
    whole = client.messages.create(**kw)
    assert [b.type for b in whole.content] == ["text"] and whole.stop_reason == "max_tokens"
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Hm" and final.content[1].name == "f"


def test_which_stop_sequence_ended_the_reply():
    """The engine cuts the text where a stop string begins: the stop sequence is the one the
    generated ids go on with there; a reply that ended otherwise is end_turn."""
    def script(ids, params):  # "ab", then "XY", which the engine cut (stop string "XY")
        return [StepEvent(0, ord("a"), "a", None), StepEvent(0, ord("b"), "b", None),
                StepEvent(0, ord("X"), "", None), StepEvent(0, ord("Y"), "", None, True, "stop")]

    client = client_of(FakeEngine(script))
    for stops, expected in ((["Q", "XY"], ("stop_sequence", "XY")), (["Q"], ("end_turn", None))):
        m = client.messages.create(model=MODEL, max_tokens=8, messages=HI, stop_sequences=stops)
        assert (m.stop_reason, m.stop_sequence) == expected and text_of(m) == "ab"
        with client.messages.stream(model=MODEL, max_tokens=8, messages=HI, stop_sequences=stops) as stream:
            assert (stream.get_final_message().stop_reason, stream.get_final_message().stop_sequence) == expected


def test_an_engine_that_stops_midway_ends_the_stream_with_an_error_event():
    """Anthropic's `error` event, which the client raises as an APIStatusError with its body."""
    client = client_of(FakeEngine(lambda ids, p: [StepEvent(0, ord("a"), "a", None), EngineStopped("it stopped")]))
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model=MODEL, max_tokens=8, messages=HI) as stream:
            stream.get_final_message()
    assert e.value.body == {"type": "error", "error": {"type": "api_error", "message": "it stopped"}}


def test_conversation_shapes_and_count_tokens():
    """The prompt a Messages request makes is the chat's: consecutive turns of one role are one
    turn, a tool_result with is_error says so, thinking blocks are left out; count_tokens gives
    its length, as a message's input_tokens."""
    engine = scripted(spell("ok") + [EOS])
    client = client_of(engine)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "no",
                                              "is_error": True}, {"type": "text", "text": "c"}]}]
    m = client.messages.create(model=MODEL, max_tokens=4, messages=messages, tools=[TOOL_F], system="s")
    (prompt, _), = engine.submitted
    assert prompt == FakeTokenizer().encode("system:s\nuser:ab\nassistant:\ntool:Error: no\nuser:c\n")
    counted = client.messages.count_tokens(model=MODEL, messages=messages, tools=[TOOL_F], system="s")
    assert counted.input_tokens == len(prompt) == m.usage.input_tokens
