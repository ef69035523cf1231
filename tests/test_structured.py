"""Structured outputs (issue 18): every constrained output parses and validates (jsonschema, not
our code, is the judge), on the default model, which cannot do it unconstrained, and on both
Mistral tokenizers (SentencePiece v3, Tekken) with non-ASCII schemas; the bitmask against
llguidance's own NumPy reference; constrained rows leave unconstrained ones unchanged; bad
constraints fail with a message that names them. Forced tool calls on the default model finish
with valid arguments (issue 43; its unit tests: test_forced_tool_calls.py)."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from mistral_jax import LLM, SamplingParams
from mistral_jax.sample.sampling import allowed_tokens
from mistral_jax.sample.structured import StructuredOutputs, tool_calls
from mistral_jax.tool_calls import tool_call_format

S = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded: a small model may repeat digits forever
N = {"type": "number", "minimum": -99, "maximum": 99}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": N,
     "y": N}, "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"},
                                      "r": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"anyOf": [INT, {"type": "object", "properties": {"v": S}, "required": ["v"],
                                      "additionalProperties": False}]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 8}}, "required": ["maybe"],
     "additionalProperties": False},
    {"type": "object", "$defs": {"item": {"type": "object", "properties": {"id": INT},
     "required": ["id"], "additionalProperties": False}}, "properties": {"items": {"type": "array",
     "items": {"$ref": "#/$defs/item"}, "maxItems": 3}}, "required": ["items"], "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"city": {"enum": ["Zürich", "São Paulo", "東京", "Αθήνα"]},
     "température": N}, "required": ["city", "température"], "additionalProperties": False},
    {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3, "maxItems": 3},
    {"type": "object", "properties": {"user": {"type": "object",
                                               "properties": {"name": S, "admin": {"type": "boolean"}},
     "required": ["name", "admin"], "additionalProperties": False}, "ids": {"type": "array",
     "items": INT, "maxItems": 2}}, "required": ["user", "ids"], "additionalProperties": False},
    {"type": "object", "properties": {"emoji": {"type": "string", "pattern": "^[😀🎉]{1,3}$"}},
     "required": ["emoji"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
     "required": ["n"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "null"},
]


@pytest.fixture(scope="module")
def demo():
    return LLM(max_model_len=1024, progress=False)


def check_outputs(outs, schemas):
    for out, schema in zip(outs, schemas):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
def test_default_model_follows_every_schema(demo):
    assert len(SCHEMAS) >= 20
    prompts = [f"Give an example of JSON for this schema: {json.dumps(s, ensure_ascii=False)}" for s in SCHEMAS]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=120, structured_outputs=StructuredOutputs(json=s))
              for i, s in enumerate(SCHEMAS)]
    check_outputs(demo.generate(prompts, params), SCHEMAS)
    # The same model unconstrained fails most of them (what the constraint buys).
    free = demo.generate(prompts,
                         [SamplingParams(temperature=0.7, seed=i, max_tokens=120) for i in range(len(SCHEMAS))])
    valid = 0
    for out, schema in zip(free, SCHEMAS):
        try:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid < len(SCHEMAS) // 2


# ---- forced tool calls ------------------------------------------------------------------------


def _tool(name: str, description: str, properties: dict, required: list[str] = ()) -> dict:
    """An OpenAI function tool with an ordinary object schema (additionalProperties unset)."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(required)}}}


def _object(properties: dict, required: list[str] = ()) -> dict:
    return {"type": "object", "properties": properties, **({"required": list(required)} if required else {})}


STR, NUM, BOOL, INTEGER = {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "integer"}
TEXT = {"type": "string", "maxLength": 60}  # free text, bounded (see TOOLS)


def _list(items: dict, most: int = 4) -> dict:
    return {"type": "array", "items": items, "maxItems": most}


# (tool, the user's request): ordinary schemas as clients send them: nested objects, arrays,
# enums, optional fields, no additionalProperties anywhere. Free text and lists are bounded
# (maxLength, maxItems), as SCHEMAS' are: greedy decoding of a 135M model may repeat itself
# inside an unbounded value ("at 3pm at 3pm at 3pm..."), a failure of its own that closing
# objects does not address.
TOOLS = [
    (_tool("get_weather", "Current weather in a city",
           {"city": STR, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
     "What's the weather in Paris?"),
    (_tool("get_time", "Local time in a time zone", {"timezone": STR}),
     "What time is it in Tokyo?"),
    (_tool("send_email", "Send an email", {"to": STR, "subject": TEXT, "body": TEXT}, ["to", "subject", "body"]),
     "Email bob@example.com that the meeting moved to 3pm."),
    (_tool("add", "Add two numbers", {"a": NUM, "b": NUM}, ["a", "b"]),
     "What is 17 plus 25?"),
    (_tool("search_web", "Search the web", {"query": STR, "max_results": INTEGER}, ["query"]),
     "Find recent news about solar panels."),
    (_tool("create_event", "Create a calendar event",
           {"title": STR, "start": _object({"date": STR, "time": STR}, ["date"]), "attendees": _list(STR)},
           ["title", "start"]),
     "Schedule lunch with Ana on 2024-05-02 at noon."),
    (_tool("set_thermostat", "Set the thermostat",
           {"temperature": NUM, "mode": {"enum": ["heat", "cool", "auto"]}}, ["temperature", "mode"]),
     "Heat the house to 21 degrees."),
    (_tool("translate", "Translate text", {"text": STR, "target_language": STR}, ["text", "target_language"]),
     "Translate 'good morning' into Spanish."),
    (_tool("book_flight", "Book a flight",
           {"origin": STR, "destination": STR, "passengers": _object({"adults": INTEGER, "children": INTEGER},
                                                                     ["adults"]),
            "class": {"enum": ["economy", "business"]}}, ["origin", "destination", "passengers"]),
     "Book a flight from Boston to Denver for two adults."),
    (_tool("convert_currency", "Convert money between currencies",
           {"amount": NUM, "from": STR, "to": STR}, ["amount", "from", "to"]),
     "How much is 100 US dollars in euros?"),
    (_tool("add_todo", "Add items to the to-do list",
           {"items": _list(_object({"task": STR, "done": BOOL}, ["task"]))}, ["items"]),
     "Add 'buy milk' and 'call mom' to my to-do list."),
    (_tool("get_stock_price", "Latest stock price", {"symbol": STR}, ["symbol"]),
     "How is Apple stock doing?"),
    (_tool("play_music", "Play music", {"artist": STR, "song": STR, "shuffle": BOOL}),
     "Play some Beatles songs."),
    (_tool("order_pizza", "Order a pizza",
           {"size": {"enum": ["small", "medium", "large"]}, "toppings": _list(STR),
            "address": _object({"street": STR, "city": STR}, ["street"])}, ["size", "address"]),
     "Order a large pepperoni pizza to 12 Main Street."),
    (_tool("set_alarm", "Set an alarm", {"hour": INTEGER, "minute": INTEGER, "label": STR}, ["hour", "minute"]),
     "Wake me up at 6:30."),
    (_tool("lookup_user", "Find a user account",
           {"filter": _object({"email": STR, "name": STR, "active": BOOL})}, ["filter"]),
     "Find the account of jane@example.com."),
    (_tool("rate_movie", "Rate a movie",
           {"title": STR, "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "review": TEXT}, ["title", "stars"]),
     "Give Inception five stars."),
    (_tool("resize_image", "Resize an image",
           {"url": STR, "size": _object({"width": INTEGER, "height": INTEGER}, ["width", "height"])},
           ["url", "size"]),
     "Make https://example.com/cat.png 200 by 100 pixels."),
    (_tool("run_sql", "Run a read-only SQL query",
           {"query": STR, "params": _list({"type": ["string", "number"]})}, ["query"]),
     "How many users signed up last week?"),
    (_tool("get_directions", "Route between two places",
           {"from": STR, "to": STR, "mode": {"enum": ["driving", "walking", "transit"]},
            "avoid": _list({"enum": ["tolls", "highways", "ferries"]}, 3)}, ["from", "to"]),
     "How do I walk from the Louvre to the Eiffel Tower?"),
]


@pytest.mark.slow
def test_default_model_forced_tool_calls_finish(demo):
    """Every greedy forced call over TOOLS' ordinary schemas ends (no finish_reason "length")
    in one call whose arguments validate against its tool's schema: tool_choice "required"
    (with parallel_tool_calls false) for half of them, the function named for the others (what
    LangChain's with_structured_output sends), each prompt offering the tool and the next one.

    Parallel calls are left out: the grammar lets a "required" reply add call after call, and
    this model, greedy, sometimes does until max_tokens; how many calls a reply makes is not
    what closing objects is about."""
    tok = demo.tokenizer
    prompts, params, expected = [], [], []
    for i, (t, request) in enumerate(TOOLS):
        offered = [t, TOOLS[(i + 1) % len(TOOLS)][0]]
        name = t["function"]["name"] if i % 2 else None  # None: tool_choice "required"
        prompts.append({"prompt_token_ids": tok.encode_chat([{"role": "user", "content": request}], tools=offered)})
        params.append(SamplingParams(temperature=0, max_tokens=200,
                                     structured_outputs=tool_calls(tok, offered, name=name, one=True)))
        expected.append({x["function"]["name"]: x["function"]["parameters"] for x in offered
                         if name in (None, x["function"]["name"])})
    outs = demo.generate(prompts, params)
    for out, schemas in zip(outs, expected):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        content, calls = tool_call_format(tok).parse(o.token_ids)
        assert content == "" and len(calls) == 1 and calls[0].name in schemas, o.text
        jsonschema.validate(calls[0].arguments, schemas[calls[0].name])


@pytest.mark.slow
def test_regex_choice_grammar_and_json_object(demo):
    specs = [StructuredOutputs(regex=r"[A-Z][a-z]{2,8} is [0-9]{2}"),
             StructuredOutputs(choice=["Paris", "Rome", "Oslo"]),
             StructuredOutputs(grammar='start: "The answer is " ("yes" | "no") "."'),
             StructuredOutputs(json_object=True)]
    prompts = ["Answer:"] * 3 + ["Describe Paris as a JSON object with keys name and country."]
    outs = demo.generate(prompts, [SamplingParams(temperature=0.9 if i < 3 else 0, seed=i, max_tokens=100,
                                                  structured_outputs=s) for i, s in enumerate(specs)])
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{2}", texts[0])
    assert texts[1] in ("Paris", "Rome", "Oslo")
    assert texts[2] in ("The answer is yes.", "The answer is no.")
    assert isinstance(json.loads(texts[3]), dict)


@pytest.mark.slow
def test_constrained_rows_leave_the_others_unchanged(demo):
    prompts = ["What is the capital of France?", "Name a colour:", "Count to five:"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].text for o in demo.generate(prompts, greedy)]
    mixed = demo.generate(prompts + ["JSON please:"] * 3,
                          [greedy] * 3 + [SamplingParams(temperature=0.8, seed=i, max_tokens=80,
                                                         structured_outputs=StructuredOutputs(json=SCHEMAS[0]))
                                          for i in range(3)])
    assert [o.outputs[0].text for o in mixed[:3]] == alone
    check_outputs(mixed[3:], [SCHEMAS[0]] * 3)


@pytest.mark.parametrize("vocab", [32768, 131072])
@pytest.mark.slow
def test_mistral_tokenizers_non_ascii(tmp_path, vocab):
    """Random weights of a small shape with mistral-common's v3 (SentencePiece) or Tekken
    tokenizer: the grammar alone makes the output valid, non-ASCII included."""
    params = {"dim": 64, "n_layers": 1, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
              "norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 1e6, "max_seq_len": 256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    llm = LLM(load_format="dummy", config=str(tmp_path), max_model_len=256, progress=False)
    schemas = [SCHEMAS[13], SCHEMAS[18],
               {"type": "object", "properties": {"mot": {"enum": ["éléphant", "ñandú", "Straße"]},
                                                 "数": {"type": "integer", "maximum": 9}},
                "required": ["mot", "数"], "additionalProperties": False}]
    outs = llm.generate([{"prompt_token_ids": [1, 100 + i]} for i in range(len(schemas))],
                        [SamplingParams(temperature=1.0, seed=i, max_tokens=100,
                                        structured_outputs=StructuredOutputs(json=s))
                         for i, s in enumerate(schemas)])
    check_outputs(outs, schemas)
    out = llm.generate([{"prompt_token_ids": [1, 7]}], SamplingParams(
        temperature=1.0, seed=0, max_tokens=20, structured_outputs=StructuredOutputs(choice=["naïve", "日本"])))
    assert out[0].outputs[0].text in ("naïve", "日本")


def test_bitmask_matches_llguidance_numpy_reference():
    import llguidance.numpy as lnp

    rng = np.random.default_rng(0)
    for rows, vocab in [(1, 32), (3, 33), (4, 1000), (2, 131072)]:
        bits = rng.integers(-2**31, 2**31, size=lnp.get_bitmask_shape(rows, vocab), dtype=np.int64).astype(np.int32)
        logits = rng.standard_normal((rows, vocab)).astype(np.float32)
        ref = logits.copy()
        lnp.apply_token_bitmask_inplace(ref, bits)
        allowed = np.asarray(jax.jit(allowed_tokens, static_argnums=1)(jnp.asarray(bits), vocab))
        ours = np.where(allowed, logits, -np.inf)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("spec, words", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "properties/a/type"),
    (dict(json={"type": "object", "required": "a"}), "required"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: (("), "grammar"),
])
@pytest.mark.slow
def test_invalid_constraints_are_named(demo, spec, words):
    good = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(choice=["a"]))
    with pytest.raises(ValueError, match=re.escape(words)):
        demo.generate(["x", "y"], [good, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(**spec))])
    assert not demo.engine.has_unfinished_requests()  # the good one was not queued either


@pytest.mark.parametrize("kwargs, words", [
    (dict(), "exactly one"), (dict(regex="a", choice=["a"]), "exactly one"), (dict(choice=[]), "choice"),
    (dict(choice=["a", 3]), "choice"), (dict(regex=""), "regex"),
])
def test_bad_specs(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StructuredOutputs(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})
