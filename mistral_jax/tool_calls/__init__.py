"""Tool calls: the model writes them in its own format, which is read back from its output as it
is generated (so calls stream) and, when a call must happen (tool_choice "required" or a named
function), enforced by a grammar.

- call.py: `ToolCall`, a call as OpenAI's API returns it, and call ids
- format.py: `ToolCallFormat`, the interface: a reader of one reply and the pieces it tells
  (content, calls that begin, stream their arguments and end), a whole reply read, its grammar
- mistral.py: `MistralToolCalls`, [TOOL_CALLS] formats of mistral-common's tokenizers
- hermes.py: `HermesToolCalls`, <tool_call> blocks of ChatML models
- json_scan.py: JSON read a character at a time, and the calls a JSON value holds
- grammar.py: Lark building blocks of the formats' grammars

A tokenizer names its format (`Tokenizer.tool_call_parser`); `tool_call_format` gives it."""

from __future__ import annotations

from mistral_jax.tokenizer import Tokenizer
from mistral_jax.tool_calls.call import ToolCall, new_tool_call_id
from mistral_jax.tool_calls.format import (
    ArgumentsText,
    CallBegins,
    CallEnds,
    Content,
    Piece,
    Reply,
    ToolCallFormat,
    ToolCallReader,
)
from mistral_jax.tool_calls.hermes import HermesToolCalls
from mistral_jax.tool_calls.mistral import MistralToolCalls

# Formats by vLLM's --tool-call-parser name.
PARSERS: dict[str, type[ToolCallFormat]] = {"mistral": MistralToolCalls, "hermes": HermesToolCalls}


def tool_call_format(tokenizer: Tokenizer) -> ToolCallFormat:
    """The format the tokenizer's model writes tool calls in (the base class where it names none),
    built once per tokenizer and kept on it."""
    fmt = tokenizer.__dict__.get("_tool_call_format")
    if fmt is None:
        parser = PARSERS.get(tokenizer.tool_call_parser, ToolCallFormat)
        fmt = tokenizer.__dict__["_tool_call_format"] = parser(tokenizer)
    return fmt


__all__ = ["ArgumentsText", "CallBegins", "CallEnds", "Content", "HermesToolCalls", "MistralToolCalls", "PARSERS",
           "Piece", "Reply", "ToolCall", "ToolCallFormat", "ToolCallReader", "new_tool_call_id", "tool_call_format"]
