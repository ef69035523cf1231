"""Hermes tool calls, the common convention of ChatML models (SmolLM2's included):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the text, a block holding
one call or a JSON list of them."""

from __future__ import annotations

from mistral_jax.tool_calls.format import Content, Piece, ToolCallFormat, ToolCallReader
from mistral_jax.tool_calls.grammar import json_call
from mistral_jax.tool_calls.json_scan import WHITESPACE, JsonCalls

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolCalls(ToolCallFormat):
    name = "hermes"

    def reader(self) -> HermesReader:
        return HermesReader()

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        # The blocks the reader reads: <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>
        more = "" if one else ' ("\\n" block)*'
        return (f'start: block{more}\nblock: "<tool_call>\\n" call "\\n</tool_call>"\n'
                f'call: {json_call(tools, json_style)}')


# What the reader is reading.
_TEXT, _CALLS, _CLOSING, _SKIPPING = range(4)


class HermesReader(ToolCallReader):
    """Reads the reply's text (the ids are not needed: the blocks are plain text).

    Text streams as content except what could still begin a block: a tail that is the start of
    "<tool_call>", and the whitespace before it. Whitespace around blocks is no content (a reply
    that only calls has none). Inside a block, the JSON is read as it comes (JsonCalls); after
    it, "</tool_call>" closes the block. A block that turns out to be no call before any call in
    it began is content after all, marker included; one that breaks after a call began is
    dropped up to its "</tool_call>"; one the reply ends inside of is dropped. A tail held back
    when the reply ends is text, unless max_tokens cut the reply there (it may have been a call).

    State: what is being read, the text held back (pending), the whitespace before the open block
    (dropped if it holds a call), whether whitespace after a block is being dropped, and the
    number of calls so far."""

    def __init__(self):
        self.mode = _TEXT
        self.pending = ""
        self.before_block = ""
        self.after_block = False
        self.calls: JsonCalls | None = None
        self.next_index = 0

    def feed(self, token_ids: list[int], text: str) -> list[Piece]:
        out: list[Piece] = []
        while text:
            text = (self._text, self._calls, self._closing, self._skipping)[self.mode](text, out)
        return out

    def end(self, cut_off: bool = False) -> list[Piece]:
        out: list[Piece] = []
        if self.mode == _TEXT:
            held = self.pending
            if cut_off and held.strip(WHITESPACE):  # the start of "<tool_call>" (and the whitespace before it)
                held = ""
            self._content(held, out)
        self.pending = ""
        return out

    # -- each mode reads some text and gives back the rest --

    def _text(self, text: str, out: list[Piece]) -> str:
        text, self.pending = self.pending + text, ""
        at = text.find(OPEN)
        if at < 0:
            held = _held(text, OPEN)
            self._content(text[: len(text) - held], out)
            self.pending = text[len(text) - held:]
            return ""
        before = text[:at].rstrip(WHITESPACE)
        self._content(before, out)
        self.before_block = text[len(before):at]
        self.mode, self.calls = _CALLS, JsonCalls(self.next_index)
        return text[at + len(OPEN):]

    def _calls(self, text: str, out: list[Piece]) -> str:
        pieces, rest = self.calls.push_text(text)
        out += pieces
        self.next_index = self.calls.next_index
        if (self.calls.error or self.calls.done) and not self.calls.begun:  # no call: it was text
            self._content(self.before_block + OPEN, out)
            self.mode, self.pending = _TEXT, ""
            return self.calls.scanner.text + rest
        if self.calls.error:
            self.mode = _SKIPPING
        elif self.calls.done:
            self.mode = _CLOSING
        return rest

    def _closing(self, text: str, out: list[Piece]) -> str:
        text, self.pending = (self.pending + text).lstrip(WHITESPACE), ""
        if text.startswith(CLOSE):
            return self._after_block(text[len(CLOSE):])
        if CLOSE.startswith(text):
            self.pending = text
            return ""
        return self._after_block(text)  # no "</tool_call>": what follows the call is text

    def _skipping(self, text: str, out: list[Piece]) -> str:
        text, self.pending = self.pending + text, ""
        at = text.find(CLOSE)
        if at < 0:
            self.pending = text[len(text) - _held(text, CLOSE, whitespace=False):]
            return ""
        return self._after_block(text[at + len(CLOSE):])

    def _after_block(self, rest: str) -> str:
        self.mode, self.after_block, self.pending, self.calls = _TEXT, True, "", None
        return rest

    def _content(self, text: str, out: list[Piece]) -> None:
        if self.after_block:  # whitespace after a block is no content
            text = text.lstrip(WHITESPACE)
            self.after_block = not text
        if text:
            out.append(Content(text))


def _held(text: str, marker: str, whitespace: bool = True) -> int:
    """How many characters at the end of text could begin the marker: the longest tail that is
    the marker's start, and (whitespace) the whitespace before it."""
    n = next((k for k in range(min(len(text), len(marker) - 1), 0, -1) if marker.startswith(text[-k:])), 0)
    if whitespace:
        n = len(text) - len(text[: len(text) - n].rstrip(WHITESPACE))
    return n
