"""The interface of a tool-call format: how one family of models writes tool calls."""

from __future__ import annotations

from mistral_jax.tokenizer import Tokenizer
from mistral_jax.tool_calls.call import ToolCall


class ToolCallFormat:
    """Reading a model's tool calls from its output, and the grammar that makes it write them.

    Invariant: every reply `grammar` allows, `parse` reads back as calls (the server constrains
    a tool_choice "required" or named reply with the one and reads it with the other).
    This base class is also the format of a tokenizer that names none: it reads no calls."""

    name: str | None = None  # vLLM's --tool-call-parser name

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def parse(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        """Split generated ids into content text and tool calls ([] when there are none);
        malformed calls come back as text."""
        raise NotImplementedError(f"{type(self.tokenizer).__name__} names no tool-call format")

    def started(self, token_ids: list[int]) -> bool | None:
        """Whether these generated ids begin tool calls (text before them can stream as it
        comes); None: this format only tells at the end (hold the reply)."""
        return None

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        """A Lark grammar (llguidance's dialect) for a reply that is only tool calls, with each
        call's arguments under its function's JSON schema. tools: OpenAI function definitions;
        one: exactly one call; json_style: llguidance's JSON formatting options."""
        raise NotImplementedError(f"{type(self.tokenizer).__name__} names no tool-call format")
