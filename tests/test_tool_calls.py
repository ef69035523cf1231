"""Tool calls: each format reads back what mistral-common writes (Mistral: [TOOL_CALLS] in its
v2-v7 and v11+ shapes) or the convention of ChatML models (Hermes <tool_call> blocks), output
that is no call comes back as text while a call cut off is no text, every reply a format's grammar
allows parses back as calls, and JsonScanner checks JSON as json.loads does, a character at a time.
(Streaming the calls: test_tool_call_stream.py.)"""

import json
import random
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MCToolCall

from mistral_jax.loading.default_model import default_model_path
from mistral_jax.sample.structured import JSON_STYLE, Matcher, StructuredOutputs, tool_calls
from mistral_jax.tokenizer import MistralTokenizer, Tokenizer, load_tokenizer
from mistral_jax.tool_calls import (
    HermesToolCalls,
    MistralToolCalls,
    Reply,
    ToolCall,
    ToolCallFormat,
    tool_call_format,
)
from mistral_jax.tool_calls.json_scan import JsonScanner

from helpers.tokenizer_files import DATA, TIME_TOOL, WEATHER_TOOL


@pytest.fixture(scope="module")
def hermes() -> Tokenizer:
    """The default model's GGUF tokenizer: a ChatML model, Hermes tool calls."""
    return load_tokenizer(Path(default_model_path()))


def _mc_call(call_id: str, name: str, args: dict) -> MCToolCall:
    return MCToolCall(id=call_id, function=FunctionCall(name=name, arguments=json.dumps(args)))


def _mc_tool(t: dict) -> Tool:
    return Tool(function=Function(**t["function"]))


# ---- parsing ------------------------------------------------------------------------------------


def _generated_part(ids: list[int], tok: MistralTokenizer) -> list[int]:
    """The assistant's tool-call turn as the model generates it: from [TOOL_CALLS] to </s> included."""
    start = ids.index(tok.special_id("[TOOL_CALLS]"))
    return ids[start : ids.index(tok.eos_id, start) + 1]


@pytest.mark.parametrize("name", ["spm_v3", "spm_v7", "tekken_v3", "tekken_v7", "tekken_v11", "tekken_v13"])
def test_parse_tool_calls_round_trip(mistral_pairs, name):
    ours, ref = mistral_pairs[name]
    calls = [("abcDEF123", "get_weather", {"city": "Paris", "unit": "C"}),
             ("xyz987QRS", "get_time", {}),
             ("k9k9k9k9k", "get_weather", {"city": "São Paulo 🙂", "nested": {"a": [1, 2.5, None, True]}})]
    request = ChatCompletionRequest(
        messages=[UserMessage(content="Weather?"), AssistantMessage(tool_calls=[_mc_call(*c) for c in calls])]
        + [ToolMessage(tool_call_id=c[0], content="ok") for c in calls],
        tools=[_mc_tool(WEATHER_TOOL), _mc_tool(TIME_TOOL)])
    generated = _generated_part(ref.encode_chat_completion(request).tokens, ours)
    content, parsed = tool_call_format(ours).parse(generated)
    assert content == ""
    assert [(c.name, c.arguments) for c in parsed] == [(n, a) for _, n, a in calls]
    # Only v11's [CALL_ID] comes before the arguments: a call's id is out with its first chunk, so
    # the v2-v7 ids, written after the arguments, are made up (and v13 writes none).
    carries_ids = name == "tekken_v11"
    if carries_ids:
        assert [c.id for c in parsed] == [c[0] for c in calls]
    for c in parsed:  # a missing id is made up, in the shape mistral-common accepts back
        assert len(c.id) == 9 and c.id.isalnum()
    # to_openai() is what a client echoes back: mistral-common must accept it in the next turn.
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in parsed]}]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in parsed]
    again = tool_call_format(ours).parse(_generated_part(ours.encode_chat(messages), ours))[1]
    assert [(c.name, c.arguments) for c in again] == [(c.name, c.arguments) for c in parsed]
    assert not carries_ids or again == parsed


def test_parse_tool_calls_with_content_and_without_calls(mistral_pairs):
    ours, _ = mistral_pairs["tekken_v11"]
    text = ours.encode("Let me check.", add_bos=False)
    call = [ours.special_id("[TOOL_CALLS]"), *ours.encode("get_time", add_bos=False), ours.special_id("[ARGS]"),
            *ours.encode('{"tz": "UTC"}', add_bos=False), ours.eos_id]
    content, calls = tool_call_format(ours).parse(text + call)
    assert content == "Let me check." and [(c.name, c.arguments) for c in calls] == [("get_time", {"tz": "UTC"})]
    assert tool_call_format(ours).parse(text + [ours.eos_id]) == ("Let me check.", [])


def _tool_call_ids(tok: MistralTokenizer, payload: str) -> list[int]:
    """[TOOL_CALLS] then payload, its "[ARGS]" as the special token."""
    ids = [tok.special_id("[TOOL_CALLS]")]
    for i, part in enumerate(payload.split("[ARGS]")):
        ids += ([tok.special_id("[ARGS]")] if i else []) + tok.encode(part, add_bos=False)
    return ids


@pytest.mark.parametrize("name,payload", [
    ("spm_v3", '[{"arguments": {}}]'),  # no name
    ("tekken_v7", '[{"name": "f", "arguments": [1, 2]}]'),  # arguments not an object
    ("tekken_v7", "not json at all"),
    ("tekken_v7", "[]"),  # no call
    ("tekken_v11", "get_weather[ARGS][1]"),
])
def test_what_is_no_call_comes_back_as_text(mistral_pairs, name, payload):
    ours, _ = mistral_pairs[name]
    ids = _tool_call_ids(ours, payload)
    content, calls = tool_call_format(ours).parse(ids + [ours.eos_id])
    assert calls == [] and content == ours.decode(ids)


@pytest.mark.parametrize("name,payload", [
    ("spm_v3", '[{"name": "get_weather", "arguments": {"city": '),  # cut off
    ("tekken_v11", "get_weather[ARGS]{\"city\": 'Paris'}"),  # single quotes: the call began, then broke
    ("tekken_v11", "get_wea"),  # cut off in the name
])
def test_a_call_that_began_is_no_text(mistral_pairs, name, payload):
    ours, _ = mistral_pairs[name]
    text = ours.encode("Let me check.", add_bos=False)
    content, calls = tool_call_format(ours).parse(text + _tool_call_ids(ours, payload) + [ours.eos_id])
    assert calls == [] and content == "Let me check."


def test_lenient_tool_call_shapes(mistral_pairs):
    """A single object instead of a list, and arguments given as a JSON string, are still calls."""
    ours, _ = mistral_pairs["spm_v3"]
    ids = [ours.special_id("[TOOL_CALLS]"), *ours.encode('{"name": "f", "arguments": "{\\"x\\": 1}"}', add_bos=False)]
    content, calls = tool_call_format(ours).parse(ids)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", {"x": 1})]


def test_hermes_tool_calls_for_gguf(hermes):
    ours = hermes
    text = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    content, calls = tool_call_format(ours).parse(ours.encode(text) + [ours.eos_id])
    assert content == "Sure." and calls == [ToolCall(calls[0].id, "get_time", {"tz": "UTC"})]
    for text in ("<tool_call>{oops</tool_call>", "plain", "a <tool_ b ", "<tool_call>\n[]\n</tool_call>\n"):
        assert tool_call_format(ours).parse(ours.encode(text)) == (text, [])  # no call: as written
    # Whitespace around blocks is no content; text between and after them is.
    two = ('\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nand\n'
           '<tool_call>[{"name": "g", "arguments": "{\\"x\\": 1}"}]</tool_call>\n')
    content, calls = tool_call_format(ours).parse(ours.encode(two))
    assert content == "and" and [(c.name, c.arguments, c.to_openai()["function"]["arguments"]) for c in calls] == [
        ("f", {}, "{}"), ("g", {"x": 1}, '{"x": 1}')]
    # A block cut off is no text.
    assert tool_call_format(ours).parse(ours.encode('Sure.<tool_call>\n{"name": "f", "argu')) == ("Sure.", [])


def test_tool_call_to_openai():
    call = ToolCall("abcDEF123", "f", {"city": "Zürich"})
    assert call.to_openai() == {"id": "abcDEF123", "type": "function",
                                "function": {"name": "f", "arguments": '{"city": "Zürich"}'}}
    assert len(ToolCall(None, "f", {}).to_openai()["id"]) == 9
    # A call read from a model returns its arguments as the model wrote them (what streams).
    written = ToolCall("abcDEF123", "f", {"city": "Zürich"}, '{ "city" : "Z\\u00fcrich" }')
    assert written.to_openai()["function"]["arguments"] == '{ "city" : "Z\\u00fcrich" }' and written == call


# ---- which format ------------------------------------------------------------------------------------


class _IdsOnly(Tokenizer):
    """A tokenizer that names no tool-call format."""


def test_each_tokenizer_names_its_format(mistral_pairs, hermes):
    mistral = mistral_pairs["tekken_v11"][0]
    assert mistral.tool_call_parser == "mistral" and isinstance(tool_call_format(mistral), MistralToolCalls)
    assert hermes.tool_call_parser == "hermes" and isinstance(tool_call_format(hermes), HermesToolCalls)
    assert mistral._tool_call_format is mistral._tool_call_format  # built once per tokenizer
    none = _IdsOnly()
    assert type(tool_call_format(none)) is ToolCallFormat
    assert tool_call_format(none).read([5, 6], "text") == Reply("text", [], 0)  # no calls: all text
    with pytest.raises(NotImplementedError, match="_IdsOnly"):
        tool_call_format(none).grammar([WEATHER_TOOL], one=True, json_style=JSON_STYLE)


def test_a_tokenizer_without_tool_calls_token():
    v1 = load_tokenizer(DATA / "tokenizer.model.v1")  # no [TOOL_CALLS]: never calls tools
    assert tool_call_format(v1).parse(v1.encode("[TOOL_CALLS] hi")) == ("[TOOL_CALLS] hi", [])
    with pytest.raises(ValueError, match="no \\[TOOL_CALLS\\] token"):
        tool_calls(v1, [WEATHER_TOOL])


# ---- grammars: what they allow parses back -----------------------------------------------------------

CALLS = [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]


def _reply(tok: Tokenizer, calls: list[tuple[str, dict]]) -> list[int]:
    """The ids of a reply that makes these calls in the tokenizer's format, as the grammar's own
    JSON style writes them (json.dumps's separators)."""
    from mistral_jax.sample.structured import llg_tokenizer

    text = llg_tokenizer(tok, tok.vocab_size).tokenize_str
    if tok.tool_call_parser == "hermes":
        return text("\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>'
                              for n, a in calls))
    fmt = tool_call_format(tok)
    if fmt.args_id is not None:  # v11+: one [TOOL_CALLS] per call
        return [t for n, a in calls for t in [fmt.tool_calls_id, *text(n), fmt.args_id, *text(json.dumps(a))]]
    return [fmt.tool_calls_id, *text(json.dumps([{"name": n, "arguments": a} for n, a in calls]))]


def _accepts(tok: Tokenizer, spec: StructuredOutputs, ids: list[int]) -> bool:
    m = Matcher(spec, tok, tok.vocab_size).matcher
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


# v11+ grammars allow several calls after one [TOOL_CALLS], which mistral-common writes (and
# parse reads) as one [TOOL_CALLS] per call: such a reply comes back as text. Known, kept as is.
FORMATS = ["spm_v3", "tekken_v3", "tekken_v7", "tekken_v11", "tekken_v13", "hermes"]


def _tokenizer(mistral_pairs, hermes, name: str) -> Tokenizer:
    return hermes if name == "hermes" else mistral_pairs[name][0]


@pytest.mark.parametrize("name", FORMATS)
def test_grammar_allows_one_call_that_parses_back(mistral_pairs, hermes, name):
    tok = _tokenizer(mistral_pairs, hermes, name)
    tools = [WEATHER_TOOL, TIME_TOOL]
    spec = tool_calls(tok, tools)
    assert spec.grammar == tool_call_format(tok).grammar(tools, one=False, json_style=JSON_STYLE)
    for one in (False, True):
        ids = _reply(tok, CALLS[:1])
        assert _accepts(tok, tool_calls(tok, tools, one=one), ids)
        content, parsed = tool_call_format(tok).parse(ids + [tok.eos_id])
        assert content == "" and [(c.name, c.arguments) for c in parsed] == CALLS[:1]
    assert not _accepts(tok, tool_calls(tok, tools, one=True), _reply(tok, CALLS))  # one call only
    assert not _accepts(tok, tool_calls(tok, tools, name="get_time"), _reply(tok, CALLS[:1]))  # the named one only
    assert not _accepts(tok, spec, _reply(tok, [("get_weather", {"unit": "C"})]))  # "city" is required


@pytest.mark.parametrize("name", FORMATS)
def test_grammar_allows_several_calls_that_parse_back(mistral_pairs, hermes, name):
    tok = _tokenizer(mistral_pairs, hermes, name)
    ids = _reply(tok, CALLS)
    assert _accepts(tok, tool_calls(tok, [WEATHER_TOOL, TIME_TOOL]), ids)
    content, parsed = tool_call_format(tok).parse(ids + [tok.eos_id])
    assert content == "" and [(c.name, c.arguments) for c in parsed] == CALLS


# ---- JSON a character at a time -----------------------------------------------------------------------


def _scans(text: str) -> bool:
    """Whether JsonScanner reads text as one whole JSON value (whitespace after it allowed)."""
    sc = JsonScanner()
    for k, ch in enumerate(text):
        if sc.done:
            return not text[k:].strip(" \t\n\r")
        sc.push(ch)
        if sc.error:
            return False
    return sc.done


def _loads(text: str) -> bool:
    try:
        json.loads(text, parse_constant=lambda c: 1 / 0)  # no NaN, Infinity
        return True
    except (ValueError, ZeroDivisionError):
        return False


@pytest.mark.parametrize("text", [
    '{}', '[]', '""', ' [ 1 , { } ] ', '"\\/\\b"', '{"k":"v","k2":[[]]}', '[-0, 12, 0.5E-1, -2.5e+3, 1e400]',
    '{"a": [true, false, null, "x\\n\\u00e9\\"", {"b": {}}]}', '["São Paulo 🙂", "\\ud83d\\ude42"]',
    '{"a" 1}', '{,}', '[1,]', '{"a": 1,}', '[01]', '[1.]', '[-]', '[.5]', '[1e]', '[+1]', '{"a": tru}', '"\\x"',
    '"\\u12g4"', "{'a': 1}", '[1 2]', '{"a": NaN}', '"a\nb"', '{"a":1}}', '{1: 2}', '[]]', '[', '{"a":', '[1',
])
def test_json_scanner_agrees_with_json_loads(text):
    assert _scans(text) == _loads(text)


def test_json_scanner_on_random_json_and_its_mutations():
    rng = random.Random(0)

    def value(depth=0):
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return rng.choice([True, False, None])
        if kind == 1:
            return rng.choice([0, -7, 3.25, -1e-9, 12345678901234567890])
        if kind in (2, 3):
            return "".join(rng.choice('ab "\\/\n\té🙂\x01') for _ in range(rng.randrange(5)))
        if kind in (4, 5):
            return {f"k{i}": value(depth + 1) for i in range(rng.randrange(3))}
        return [value(depth + 1) for _ in range(rng.randrange(3))]

    for _ in range(300):
        text = json.dumps([value()] if rng.random() < 0.5 else {"v": value()}, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1]), separators=rng.choice([None, (",", ":")]))
        assert _scans(text), text
        cut = rng.randrange(len(text))  # a prefix is no error, and not done
        sc = JsonScanner()
        for ch in text[:cut]:
            sc.push(ch)
        assert not sc.error and not sc.done
        mutated = list(text)
        at = rng.randrange(len(text))
        if rng.random() < 0.5:
            del mutated[at]
        else:
            mutated.insert(at, rng.choice('{}[]",:0-e. x\\'))
        mutated = "".join(mutated)
        if mutated.lstrip()[:1] in ("{", "[", '"'):  # the top-level values the formats read
            assert _scans(mutated) == _loads(mutated), mutated


def test_json_scanner_tells_where_values_are():
    text = '{"a": [1, "x"], "b": {"c": null}}'
    sc = JsonScanner()
    spans = []
    for ch in text:
        sc.push(ch)
        spans += [(depth, key, sc.text[start:stop]) for what, depth, key, start, stop in sc.events if what == "end"]
    assert sc.done and spans == [(2, None, "1"), (2, None, '"x"'), (1, "a", '[1, "x"]'), (2, "c", "null"),
                                 (1, "b", '{"c": null}'), (0, None, text)]
