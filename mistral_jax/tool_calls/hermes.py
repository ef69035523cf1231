"""Hermes tool calls, the common convention of ChatML models (SmolLM2's included):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the text, a block holding
one call or a JSON list of them."""

from __future__ import annotations

import json
import re

from mistral_jax.tool_calls.call import MALFORMED, ToolCall, calls_from_json
from mistral_jax.tool_calls.format import ToolCallFormat
from mistral_jax.tool_calls.grammar import json_call

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", flags=re.S)


class HermesToolCalls(ToolCallFormat):
    name = "hermes"

    # started(): the blocks are plain text spread over several tokens, so only the whole reply
    # tells (the base class's None).

    def parse(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        stops = self.tokenizer.stop_token_ids
        text = self.tokenizer.decode([t for t in token_ids if t not in stops])
        blocks = _BLOCK.findall(text)
        if not blocks:
            return text, []
        try:
            calls = [call for block in blocks for call in calls_from_json(json.loads(block))]
        except MALFORMED:
            return text, []
        return _BLOCK.sub("", text).strip(), calls

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        # The blocks parse() reads: <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>
        more = "" if one else ' ("\\n" block)*'
        return (f'start: block{more}\nblock: "<tool_call>\\n" call "\\n</tool_call>"\n'
                f'call: {json_call(tools, json_style)}')
