"""Tool calls: each format reads back what mistral-common writes (Mistral: [TOOL_CALLS] in its
v2-v7 and v11+ shapes) or the convention of ChatML models (Hermes <tool_call> blocks), malformed
output comes back as text, and every reply a format's grammar allows parses back as calls."""

import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MCToolCall

from mistral_jax.loading.default_model import default_model_path
from mistral_jax.sample.structured import JSON_STYLE, Matcher, StructuredOutputs, tool_calls
from mistral_jax.tokenizer import MistralTokenizer, Tokenizer, load_tokenizer
from mistral_jax.tool_calls import HermesToolCalls, MistralToolCalls, ToolCall, ToolCallFormat, tool_call_format

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
    carries_ids = name != "tekken_v13"  # v13 writes `name[ARGS]{...}`, without [CALL_ID]
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


@pytest.mark.parametrize("name,payload", [
    ("spm_v3", '[{"name": "get_weather", "arguments": {"city": '),  # truncated JSON
    ("spm_v3", '[{"arguments": {}}]'),  # no name
    ("tekken_v7", '[{"name": "f", "arguments": [1, 2]}]'),  # arguments not an object
    ("tekken_v7", "not json at all"),
    ("tekken_v11", "get_weather[ARGS]{\"city\": 'Paris'}"),  # single quotes
])
def test_malformed_tool_calls_come_back_as_text(mistral_pairs, name, payload):
    ours, _ = mistral_pairs[name]
    ids = [ours.special_id("[TOOL_CALLS]")]
    for i, part in enumerate(payload.split("[ARGS]")):
        ids += ([ours.special_id("[ARGS]")] if i else []) + ours.encode(part, add_bos=False)
    content, calls = tool_call_format(ours).parse(ids + [ours.eos_id])
    assert calls == [] and content == ours.decode(ids)


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
    bad = "<tool_call>{oops</tool_call>"
    assert tool_call_format(ours).parse(ours.encode(bad)) == (bad, [])
    assert tool_call_format(ours).parse(ours.encode("plain")) == ("plain", [])


def test_tool_call_to_openai():
    call = ToolCall("abcDEF123", "f", {"city": "Zürich"})
    assert call.to_openai() == {"id": "abcDEF123", "type": "function",
                                "function": {"name": "f", "arguments": '{"city": "Zürich"}'}}
    assert len(ToolCall(None, "f", {}).to_openai()["id"]) == 9


# ---- which format, and when a call has begun -------------------------------------------------------


class _IdsOnly(Tokenizer):
    """A tokenizer that names no tool-call format."""


def test_each_tokenizer_names_its_format(mistral_pairs, hermes):
    mistral = mistral_pairs["tekken_v11"][0]
    assert mistral.tool_call_parser == "mistral" and isinstance(tool_call_format(mistral), MistralToolCalls)
    assert hermes.tool_call_parser == "hermes" and isinstance(tool_call_format(hermes), HermesToolCalls)
    assert mistral._tool_call_format is mistral._tool_call_format  # built once per tokenizer
    none = _IdsOnly()
    assert type(tool_call_format(none)) is ToolCallFormat and tool_call_format(none).started([1]) is None
    with pytest.raises(NotImplementedError, match="_IdsOnly"):
        tool_call_format(none).parse([1])


def test_tool_call_started(mistral_pairs, hermes):
    ours = mistral_pairs["tekken_v11"][0]
    text = ours.encode("Let me check.", add_bos=False)
    assert tool_call_format(ours).started(text) is False
    assert tool_call_format(ours).started([*text, ours.special_id("[TOOL_CALLS]")]) is True
    assert tool_call_format(hermes).started(hermes.encode("<tool_call>")) is None  # plain text: told only at the end
    v1 = load_tokenizer(DATA / "tokenizer.model.v1")  # no [TOOL_CALLS]: never calls tools
    assert tool_call_format(v1).started(v1.encode("[TOOL_CALLS]")) is False
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
