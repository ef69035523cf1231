"""Mistral's tool calls: the special token [TOOL_CALLS], then the calls in the shape of the
tokenizer's version (mistral-common's formats):

- v2-v7: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]`, a JSON list;
- v11+: `[TOOL_CALLS]name[ARGS]{arguments}`, or `name[CALL_ID]id[ARGS]{arguments}`, one
  [TOOL_CALLS] per call."""

from __future__ import annotations

import json

from mistral_jax.tokenizer import MistralTokenizer
from mistral_jax.tool_calls.call import MALFORMED, ToolCall, calls_from_json
from mistral_jax.tool_calls.format import ToolCallFormat
from mistral_jax.tool_calls.grammar import functions, json_call, lark_str


class MistralToolCalls(ToolCallFormat):
    name = "mistral"

    def __init__(self, tokenizer: MistralTokenizer):
        super().__init__(tokenizer)
        # None where the vocabulary has no such token: no [TOOL_CALLS], no tool calls at all;
        # no [ARGS], the v2-v7 JSON list.
        self.tool_calls_id = tokenizer.special_id("[TOOL_CALLS]")
        self.args_id = tokenizer.special_id("[ARGS]")
        self.call_id_id = tokenizer.special_id("[CALL_ID]")

    def parse(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        decode = self.tokenizer.decode
        ids = list(token_ids)
        while ids and ids[-1] in self.tokenizer.stop_token_ids:  # the engine reports the stop token too
            ids.pop()
        if self.tool_calls_id is None or self.tool_calls_id not in ids:
            return decode(ids), []
        start = ids.index(self.tool_calls_id)
        calls = []
        try:
            for segment in _split_at(ids[start + 1:], self.tool_calls_id):
                calls += self._parse_segment(segment)
        except MALFORMED:
            return decode(ids), []
        return decode(ids[:start]), calls

    def started(self, token_ids: list[int]) -> bool | None:
        return self.tool_calls_id is not None and self.tool_calls_id in token_ids

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        if self.tool_calls_id is None:
            raise ValueError("this tokenizer has no [TOOL_CALLS] token: the model cannot call tools")
        if self.args_id is not None:  # v11+: [TOOL_CALLS]name[ARGS]{arguments}, once per call
            # (mistral-common writes one [TOOL_CALLS] before each call, and parse splits there)
            calls = [f'"{lark_str(name)}" <[{self.args_id}]> '
                     f'%json {json.dumps(dict(params, **{"x-guidance": json_style}))}'
                     for name, params in functions(tools)]
            call = " | ".join(f"({c})" for c in calls)
            return f"start: (<[{self.tool_calls_id}]> ({call})){'' if one else '+'}"
        # v2-v7: [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]
        call = json_call(tools, json_style, id={"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"})
        more = "" if one else ' (", " call)*'
        return f'start: <[{self.tool_calls_id}]> "[" call{more} "]"\ncall: {call}'

    def _parse_segment(self, seg: list[int]) -> list[ToolCall]:
        """The calls after one [TOOL_CALLS]: `name[ARGS]{json}` or `name[CALL_ID]id[ARGS]{json}`
        (v11+), else a JSON list of {"name", "arguments"[, "id"]} (v2-v7)."""
        decode = self.tokenizer.decode
        if self.args_id is not None and self.args_id in seg:
            cut = seg.index(self.args_id)
            head, args = seg[:cut], json.loads(decode(seg[cut + 1:]))
            call_id = None
            if self.call_id_id is not None and self.call_id_id in head:
                c = head.index(self.call_id_id)
                head, call_id = head[:c], decode(head[c + 1:]).strip()
            return [ToolCall.parsed(call_id, decode(head).strip(), args)]
        return calls_from_json(json.loads(decode(seg)))


def _split_at(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out
