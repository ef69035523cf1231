"""/v1/responses, OpenAI's Responses API, judged by the official `openai` client and its types.

Two halves:
- in-process, over the scripted engine of test_server_units.py (fast): every streamed event is
  one of the SDK's own event types (strictly validated), the events run through the SDK's
  stream accumulator (`ResponseStreamState`, what `client.responses.stream` uses) without
  complaint, and what they add up to is the whole response's output; a cut-off reply, a call
  cut off inside, a failed stream; bad input as a 4xx naming the Responses field; the
  previous_response_id store (the conversation a later request continues, the instructions it
  does not carry, LRU eviction, store=false).
- a real server on the default model (slow): `responses.create` and `responses.stream` against
  the same request through chat completions, greedy: the same text for plain text, a forced
  function call and its round trip with `function_call_output` (sent whole, and through
  previous_response_id), a `text.format` json_schema, and a conversation continued through
  previous_response_id. The server runs without the prefix cache, so that two routes' prompts
  take the same computation and greedy text can be compared token for token.

One field the SDK's ResponseUsage requires is left out on purpose:
input_tokens_details.cache_write_tokens (the prefix cache does not count what it writes per
request); the strict validation here allows that one missing field and nothing else.
"""

import json
import typing

import httpx
import jsonschema
import openai
import pytest
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import ValidationError
from test_server_units import CALL, EOS, TOOL_CALLS, FakeEngine, FakeTokenizer, client_for, spell

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server.bridge import RequestFailed
from mistral_jax.entrypoints.server.responses import ResponseStore

from helpers.server import default_model_server

# The SDK's event types by their `type` (its union is discriminated by the SDK, not by pydantic).
EVENTS = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
          for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}
UNCOUNTED = "cache_write_tokens"  # the one field of the SDK's types we do not send (module docstring)
TOOLS = [{"type": "function", "name": "get", "parameters": {"type": "object"}}]


def strictly(model, body):
    """`body` validated by the SDK's type, every field checked but UNCOUNTED; then built as the
    SDK builds what it receives (construct_type), for its stream accumulator."""
    try:
        model.model_validate(body)
    except ValidationError as e:
        others = [err for err in e.errors() if err["loc"][-1] != UNCOUNTED]
        assert not others, others
    return construct_type(type_=model, value=body)


def stream_events(response) -> list[dict]:
    """The streamed events' bodies; each SSE `event:` line names its body's type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if block:
            head, data = block.split("\n")
            body = json.loads(data.removeprefix("data: "))
            assert head == f"event: {body['type']}"
            out.append(body)
    return out


def accumulated(events: list[dict], tools=()) -> list:
    """The events through the SDK's own stream state: each one strictly its type, sequence
    numbers 0, 1, 2, ...; returns what the SDK's handler made of them."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    state = ResponseStreamState(input_tools=list(tools), text_format=openai.omit)
    out = []
    for body in events:
        out += state.handle_event(strictly(EVENTS[body["type"]], body))
    return out


def without_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]


# ---- in-process: the events, their shapes and what they add up to ---------------------------------


def test_streamed_events_are_the_sdks_and_add_up_to_the_whole_response():
    engine = FakeEngine(lambda ids, p: (spell("Hi") + [TOOL_CALLS] + spell(CALL) + [EOS], "stop", 0))
    client = client_for(engine)
    whole = client.post("/v1/responses", json={"input": "weather?", "tools": TOOLS})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    strictly(Response, body)
    assert body["status"] == "completed" and body["incomplete_details"] is None and body["id"].startswith("resp_")
    message, call = body["output"]
    assert message["type"] == "message" and message["content"] == [
        {"type": "output_text", "text": "Hi", "annotations": []}]
    assert call["type"] == "function_call" and call["name"] == "get" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert body["usage"]["output_tokens"] == 3 + len(CALL) + 1
    assert body["usage"]["input_tokens"] == len(engine.submitted[0][0])

    events = stream_events(client.post("/v1/responses", json={"input": "weather?", "tools": TOOLS, "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.completed"
    handled = accumulated(events, TOOLS)
    final = events[-1]["response"]
    assert without_ids(final["output"]) == without_ids(body["output"])
    assert {k: v for k, v in final["usage"].items()} == body["usage"]
    # the deltas add up to each item's final text and arguments, which the SDK's snapshots agree on
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi"
    assert "".join(e["delta"] for e in events
                   if e["type"] == "response.function_call_arguments.delta") == final["output"][1]["arguments"]
    snapshots = [e.snapshot for e in handled if e.type == "response.function_call_arguments.delta"]
    assert snapshots[-1] == final["output"][1]["arguments"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]  # each item's done event is the item as the response has it


def test_a_cut_off_reply_is_incomplete_and_a_call_cut_off_inside_is_no_output():
    cut = CALL[:40]  # the call has begun (its name and its first arguments are out), and is cut inside
    engine = FakeEngine(lambda ids, p: (spell("Hi") + [TOOL_CALLS] + spell(cut), "length", 0))
    client = client_for(engine)
    body = client.post("/v1/responses", json={"input": "weather?", "tools": TOOLS, "max_output_tokens": 40}).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["completed_at"] is None
    assert [(i["type"], i["status"]) for i in body["output"]] == [("message", "completed")]
    events = stream_events(client.post("/v1/responses", json={"input": "weather?", "tools": TOOLS, "stream": True,
                                                               "max_output_tokens": 40}))
    accumulated(events, TOOLS)
    assert events[-1]["type"] == "response.incomplete"
    assert without_ids(events[-1]["response"]["output"]) == without_ids(body["output"])
    # streamed, the call was added before it broke off: it is done as incomplete, never completed
    calls = [e["item"] for e in events if e["type"] == "response.output_item.done"
             and e["item"]["type"] == "function_call"]
    assert [c["status"] for c in calls] == ["incomplete"]

    # text cut off: the message itself is incomplete, its text kept
    client = client_for(FakeEngine(lambda ids, p: (spell("abc"), "length", 0)))
    body = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3}).json()
    assert body["status"] == "incomplete" and body["output"][0]["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == "abc"


def test_an_empty_reply_is_an_empty_message():
    client = client_for(FakeEngine(lambda ids, p: ([EOS], "stop", 0)))
    body = client.post("/v1/responses", json={"input": "hi"}).json()
    assert [(i["type"], i["content"][0]["text"]) for i in body["output"]] == [("message", "")]
    events = stream_events(client.post("/v1/responses", json={"input": "hi", "stream": True}))
    accumulated(events)
    assert without_ids(events[-1]["response"]["output"]) == without_ids(body["output"])


def test_a_stream_whose_request_fails_ends_with_response_failed():
    def reply(ids, params):
        return [StepEvent(0, ord("a"), "a", None), RequestFailed("a step failed", 500)]

    engine = FakeEngine(reply)
    events = stream_events(client_for(engine).post("/v1/responses", json={"input": "hi", "stream": True}))
    accumulated(events)
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "server_error", "message": "a step failed"}
    assert [e["item"]["status"] for e in events if e["type"] == "response.output_item.done"] == ["incomplete"]
    assert engine.aborted == [] and all(s.done for s in engine.streams)


# ---- in-process: bad input ----------------------------------------------------------------------


BAD = [  # (the body's fields besides a valid input, the status, the param the error names)
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input.0.content.0"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, 400, "input.0.role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input.0.call_id"),
    ({"input": []}, 400, "input"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "get"}}]}, 400, "tools.0.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
    ({"text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ({"text": {"format": {"type": "json_object"}}, "tools": TOOLS, "tool_choice": "required"}, 400, "tool_choice"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"background": True}, 400, "background"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
    ('"instructions": "\\ud800"', 400, "instructions"),  # JSON's lone surrogate: no text
    ({"model": "other"}, 404, "model"),
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BAD, ids=[p for _, _, p in BAD])
def test_bad_input_is_a_4xx_naming_the_field(fields, status, param):
    engine = FakeEngine()
    if isinstance(fields, str):  # raw JSON, for what Python's json cannot send
        r = client_for(engine).post("/v1/responses", content=f'{{"input": "hi", {fields}}}',
                                    headers={"content-type": "application/json"})
    else:
        r = client_for(engine).post("/v1/responses", json={"input": "hi", **fields})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert engine.submitted == []  # refused before any work


def test_an_unknown_response_is_a_404_that_says_where_responses_are_kept():
    r = client_for(FakeEngine()).post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_x"})
    message = r.json()["error"]["message"]
    assert "--api-server-count" in message and "store false" in message
    r = client_for(FakeEngine()).get("/v1/responses/resp_x")
    assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"


# ---- in-process: previous_response_id ---------------------------------------------------------


def test_previous_response_id_continues_the_conversation_without_its_instructions():
    engine = FakeEngine(lambda ids, p: (spell("A1") + [EOS], "stop", 0))
    client = client_for(engine)
    first = client.post("/v1/responses", json={"input": "Q1", "instructions": "old"}).json()
    second = client.post("/v1/responses", json={"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Q2"}]}], "instructions": "new", "previous_response_id": first["id"]}).json()
    prompts = [FakeTokenizer().decode(ids) for ids, _ in engine.submitted]  # "role:content" per message
    assert prompts == ["system:olduser:Q1", "system:newuser:Q1assistant:A1user:Q2"]
    assert second["previous_response_id"] == first["id"]
    third = client.post("/v1/responses", json={"input": "Q3", "previous_response_id": second["id"],
                                               "store": False}).json()
    assert FakeTokenizer().decode(engine.submitted[-1][0]) == "user:Q1assistant:A1user:Q2assistant:A1user:Q3"
    assert client.get(f"/v1/responses/{first['id']}").json() == first
    assert client.get(f"/v1/responses/{third['id']}").status_code == 404  # store false: not kept


def test_the_store_keeps_the_latest_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    store.get("a", "previous_response_id")  # used: now the latest
    store.put({"id": "c"}, [])
    assert store.get("a", "x").body == {"id": "a"} and store.get("c", "x").body == {"id": "c"}
    with pytest.raises(Exception, match="'b' is not stored here"):
        store.get("b", "previous_response_id")


# ---- a real server: the openai client, against chat completions ---------------------------------


NAME = "SmolLM2-135M-Instruct"  # the default model's served name
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


@pytest.fixture(scope="module")
def client():
    """The default model without the prefix cache (module docstring), no warm-up: the few programs
    these requests need compile on first use."""
    s = default_model_server("--no-enable-prefix-caching")
    try:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    finally:
        code = s.stop()
    assert code == 0


def chat(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw).choices[0]


def streamed(client, **kw):
    """responses.stream's events and final response, as the SDK's helper gives them."""
    with client.responses.stream(model=NAME, temperature=0, **kw) as stream:
        events = list(stream)
        return events, stream.get_final_response()


@pytest.mark.slow
def test_text_whole_and_streamed_matches_chat(client):
    system, question = "You are terse.", "Name three colors."
    whole = client.responses.create(model=NAME, instructions=system, input=question, temperature=0,
                                    max_output_tokens=64)
    reference = client.chat.completions.create(model=NAME, temperature=0, max_completion_tokens=64, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}])
    text = reference.choices[0].message.content
    assert whole.output_text == text and text.strip()
    assert reference.choices[0].finish_reason == "stop" and whole.status == "completed"
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (reference.usage.prompt_tokens,
                                                                     reference.usage.completion_tokens)
    events, final = streamed(client, instructions=system, input=question, max_output_tokens=64)
    assert final.output_text == text and final.id == events[0].response.id
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text

    # cut off by max_output_tokens: incomplete, the same text as chat's "length"
    cut = client.responses.create(model=NAME, input=question, temperature=0, max_output_tokens=3)
    short = chat(client, [{"role": "user", "content": question}], max_completion_tokens=3)
    assert short.finish_reason == "length" and cut.output_text == short.message.content
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    raw = list(client.responses.create(model=NAME, input=question, temperature=0, max_output_tokens=3, stream=True))
    assert raw[-1].type == "response.incomplete" and raw[-1].response.output_text == short.message.content


@pytest.mark.slow
def test_function_call_round_trip_matches_chat(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.responses.create(model=NAME, input=[question], tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=64)
    reference = chat(client, [question], tools=[CHAT_WEATHER], tool_choice="required", parallel_tool_calls=False,
                     max_completion_tokens=64)
    (call,) = [item for item in first.output if item.type == "function_call"]
    (ref_call,) = reference.message.tool_calls
    assert (call.name, call.arguments) == (ref_call.function.name, ref_call.function.arguments)
    assert first.status == "completed" and json.loads(call.arguments)["city"]

    result = json.dumps({"city": "Paris", "sky": "sunny", "celsius": 21})
    output = {"type": "function_call_output", "call_id": call.call_id, "output": result}
    answer = client.responses.create(model=NAME, input=[question, call, output], tools=[WEATHER], temperature=0,
                                     max_output_tokens=48)
    ref_answer = chat(client, [question, {"role": "assistant", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result}], tools=[CHAT_WEATHER],
        max_completion_tokens=48)
    assert answer.output_text == ref_answer.message.content and answer.output_text.strip()
    assert not [i for i in answer.output if i.type == "function_call"]

    # the same round trip through previous_response_id, streamed: the same answer
    events, final = streamed(client, previous_response_id=first.id, input=[output], tools=[WEATHER],
                             max_output_tokens=48)
    assert final.output_text == answer.output_text and final.previous_response_id == first.id


@pytest.mark.slow
def test_json_schema_text_format_matches_chat(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    question = "Name a city and its country, as JSON."
    r = client.responses.create(model=NAME, input=question, temperature=0, max_output_tokens=48, text={
        "format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    reference = chat(client, [{"role": "user", "content": question}], max_completion_tokens=48, response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    assert r.status == "completed" and r.output_text == reference.message.content
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


@pytest.mark.slow
def test_previous_response_id_matches_the_whole_conversation_through_chat(client):
    first = client.responses.create(model=NAME, instructions="You are terse.", input="My name is Ada.",
                                    temperature=0, max_output_tokens=24)
    second = client.responses.create(model=NAME, previous_response_id=first.id, input="What is my name?",
                                     temperature=0, max_output_tokens=24)
    reference = chat(client, [{"role": "user", "content": "My name is Ada."},  # instructions do not carry over
                              {"role": "assistant", "content": first.output_text},
                              {"role": "user", "content": "What is my name?"}], max_completion_tokens=24)
    assert second.output_text == reference.message.content and second.output_text.strip()
    assert client.responses.retrieve(first.id).output_text == first.output_text

    unstored = client.responses.create(model=NAME, input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=NAME, previous_response_id=unstored.id, input="again")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=NAME, input="hi", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools.0.type"
    r = httpx.post(str(client.base_url) + "responses", json={"input": "hi", "max_output_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
