"""Forced tool calls finish (issue 43): with tool_choice "required" or a named function and
ordinary schemas (no additionalProperties), the grammar closes argument objects, so a model
cannot invent keys until max_tokens; and a chat template with no place for tools gets them in
a system message. jsonschema, not our code, judges the closed schemas; llguidance's own matcher
judges the grammars. The default model's forced calls, end to end, are in test_structured.py
(which shares its model)."""

import json
from pathlib import Path

import jsonschema
import pytest

from mistral_jax.loading.default_model import default_model_path
from mistral_jax.sample.structured import Matcher, StructuredOutputs, llg_tokenizer, tool_calls
from mistral_jax.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from mistral_jax.tool_calls.grammar import closed_schema

STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}


def tool(name: str, properties: dict, required: list[str] = ()) -> dict:
    """An OpenAI function tool with an ordinary object schema (additionalProperties unset)."""
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": properties, "required": list(required)}}}


WEATHER = tool("get_weather", {"city": STR, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"])
ADD = tool("add", {"a": NUM, "b": NUM}, ["a", "b"])
EVENT = tool("create_event", {  # a nested object and an array
    "title": STR, "start": {"type": "object", "properties": {"date": STR, "time": STR}, "required": ["date"]},
    "attendees": {"type": "array", "items": STR}}, ["title", "start"])


@pytest.fixture(scope="module")
def hermes() -> Tokenizer:
    """The default model's GGUF tokenizer: its template has no place for tools; Hermes calls."""
    return load_tokenizer(Path(default_model_path()))


# ---- the closed schema, judged by jsonschema -----------------------------------------------------

NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"name": STR, "tags": {"type": "array", "items": {
        "type": "object", "properties": {"k": STR}}}}},
    "choice": {"anyOf": [{"type": "object", "properties": {"a": INT}}, {"type": "null"}]},
    "ref": {"$ref": "#/$defs/point"}}, "$defs": {"point": {"type": "object", "properties": {"x": NUM}}}}
VALID = {"user": {"name": "a", "tags": [{"k": "v"}]}, "choice": {"a": 1}, "ref": {"x": 1.5}}


@pytest.mark.parametrize("extra", [
    {"extra": 1},
    {"user": {"name": "a", "tags": [{"k": "v"}], "extra": 1}},
    {"user": {"name": "a", "tags": [{"k": "v", "extra": 1}]}},
    {"choice": {"a": 1, "extra": 1}},
    {"ref": {"x": 1.5, "extra": 1}},
])
def test_closed_schema_rejects_extra_keys_at_every_level(extra):
    instance = {**VALID, **extra}
    jsonschema.validate(instance, NESTED)  # JSON Schema allows it
    jsonschema.validate(VALID, closed_schema(NESTED))
    with pytest.raises(jsonschema.ValidationError, match="extra"):
        jsonschema.validate(instance, closed_schema(NESTED))


def test_closed_schema_keeps_what_the_schema_says():
    open_map = {"type": "object", "additionalProperties": INT}
    assert closed_schema(open_map) == open_map  # a schema that sets additionalProperties keeps it
    closed = closed_schema({"type": "object", "additionalProperties": {"type": "object", "properties": {"a": INT}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"k": {"a": 1, "b": 2}}, closed)  # a map's values are closed too
    assert closed_schema({"type": "object"}) == {"type": "object", "additionalProperties": False}  # only {}
    # Keys that `required` names without listing them stay allowed.
    req = closed_schema({"type": "object", "properties": {"a": INT}, "required": ["a", "b"]})
    jsonschema.validate({"a": 1, "b": [2]}, req)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1, "b": [2], "c": 3}, req)
    # An allOf of several objects keeps its members open: each names keys of the whole.
    both = {"allOf": [{"type": "object", "properties": {"a": INT}, "required": ["a"]},
                      {"type": "object", "properties": {"b": INT}, "required": ["b"]}]}
    jsonschema.validate({"a": 1, "b": 2}, closed_schema(both))
    # The input is not changed.
    src = json.loads(json.dumps(NESTED))
    closed_schema(src)
    assert src == NESTED


# ---- the grammar, judged by llguidance's matcher ------------------------------------------------


def _accepts(tok: Tokenizer, spec: StructuredOutputs, text: str) -> bool:
    ids = llg_tokenizer(tok, tok.vocab_size).tokenize_str(text)
    m = Matcher(spec, tok, tok.vocab_size).matcher
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def _call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_tool_call_grammar_rejects_extra_keys(hermes):
    tools = [EVENT]
    good = {"title": "Lunch", "start": {"date": "2024-05-02", "time": "12:00"}, "attendees": ["Ana"]}
    for spec in (tool_calls(hermes, tools), tool_calls(hermes, tools, name="create_event", one=True)):
        assert _accepts(hermes, spec, _call("create_event", good))
        assert not _accepts(hermes, spec, _call("create_event", {**good, "location": "cafe"}))
        assert not _accepts(hermes, spec, _call("create_event", {**good, "start": {"date": "2024-05-02", "tz": "Z"}}))
    # A function without parameters takes {} only.
    no_params = [{"type": "function", "function": {"name": "ping"}}]
    assert _accepts(hermes, tool_calls(hermes, no_params), _call("ping", {}))
    assert not _accepts(hermes, tool_calls(hermes, no_params), _call("ping", {"x": 1}))


A = {"type": "object", "properties": {"a": INT}, "required": ["a"]}
B = {"type": "object", "properties": {"b": INT}, "required": ["b"]}


@pytest.mark.parametrize("params, good, bad", [
    # Each allOf member names keys of the whole: closing either would make the pair unsatisfiable.
    ({"allOf": [A, B]}, {"a": 1, "b": 2}, None),
    ({"type": "object", "properties": {"p": {"allOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]},
                                       "q": {"$ref": "#/$defs/A"}}, "$defs": {"A": A, "B": B}},
     {"p": {"a": 1, "b": 2}, "q": {"a": 3}}, {"p": {"a": 1, "b": 2}, "q": {"a": 3}, "r": 4}),
    # A tree: "#" is the arguments' own root, where the call's grammar puts them.
    ({"type": "object", "properties": {"name": STR, "children": {"type": "array", "items": {"$ref": "#"},
                                                                 "maxItems": 2}}, "required": ["name"]},
     {"name": "a", "children": [{"name": "b", "children": []}]}, {"name": "a", "children": [{"name": "b", "x": 1}]}),
    # pydantic's Optional[Model]: the model's object is closed.
    ({"type": "object", "properties": {"m": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}},
      "$defs": {"A": A}}, {"m": {"a": 1}}, {"m": {"a": 1, "z": 2}}),
])
def test_tool_call_grammar_compiles_combined_schemas(hermes, params, good, bad):
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    spec = tool_calls(hermes, tools)
    assert _accepts(hermes, spec, _call("f", good))
    if bad is not None:
        jsonschema.validate(bad, params)
        assert not _accepts(hermes, spec, _call("f", bad))


def test_response_format_schemas_keep_json_schema_meaning(hermes):
    """Only tool-call grammars close objects: a response_format schema allows other keys."""
    schema = EVENT["function"]["parameters"]
    value = {"title": "Lunch", "start": {"date": "2024-05-02"}, "location": "cafe"}
    assert _accepts(hermes, StructuredOutputs(json=schema), json.dumps(value))


# ---- the prompt: tools where the template has no place for them ---------------------------------


def test_template_without_tools_gets_them_in_a_system_message(hermes):
    assert not hermes.template_takes_tools
    tools = [WEATHER, ADD]
    user = [{"role": "user", "content": "Hi"}]
    plain = hermes.render_chat(user)
    prompt = hermes.render_chat(user, tools)
    assert prompt != plain
    for name in ("get_weather", "add"):
        assert f'"name": "{name}"' in prompt
    assert "<tool_call>" in prompt and '"arguments"' in prompt
    assert prompt.index("get_weather") < prompt.index("Hi")  # before the conversation, in a system turn
    # A system message of the caller's keeps its text, with the tools after it, in one system turn.
    mine = hermes.render_chat([{"role": "system", "content": "Be brief."}, *user], tools)
    assert mine.count("<|im_start|>system") == 1
    assert mine.index("Be brief.") < mine.index("get_weather") < mine.index("Hi")


def test_template_with_tools_is_unchanged(hermes):
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    tok = HFTokenizer(hermes.tok, None, hermes.eos_id, template)
    assert tok.template_takes_tools
    tools = [WEATHER]
    messages = [{"role": "user", "content": "Hi"}]
    # The tools once, where the template puts them, and nothing added.
    assert tok.render_chat(messages, tools) == "TOOLS:get_weather;user: Hi\n"
