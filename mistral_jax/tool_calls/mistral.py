"""Mistral's tool calls: the special token [TOOL_CALLS], then the calls in the shape of the
tokenizer's version (mistral-common's formats):

- v2-v7: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]`, a JSON list;
- v11+: `[TOOL_CALLS]name[ARGS]{arguments}`, or `name[CALL_ID]id[ARGS]{arguments}`, one
  [TOOL_CALLS] per call."""

from __future__ import annotations

import json

from mistral_jax.tokenizer import MistralTokenizer, StreamDecoder
from mistral_jax.tool_calls.call import ToolCall, call_id_or_new
from mistral_jax.tool_calls.format import (
    ArgumentsText,
    CallBegins,
    CallEnds,
    Content,
    Piece,
    ToolCallFormat,
    ToolCallReader,
)
from mistral_jax.tool_calls.grammar import functions, json_call, lark_str
from mistral_jax.tool_calls.json_scan import WHITESPACE, JsonCalls, JsonScanner, arguments_in_string


class MistralToolCalls(ToolCallFormat):
    name = "mistral"

    def __init__(self, tokenizer: MistralTokenizer):
        super().__init__(tokenizer)
        # None where the vocabulary has no such token: no [TOOL_CALLS], no tool calls at all;
        # no [ARGS], the v2-v7 JSON list.
        self.tool_calls_id = tokenizer.special_id("[TOOL_CALLS]")
        self.args_id = tokenizer.special_id("[ARGS]")
        self.call_id_id = tokenizer.special_id("[CALL_ID]")

    def reader(self) -> MistralReader:
        return MistralReader(self)

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        if self.tool_calls_id is None:
            raise ValueError("this tokenizer has no [TOOL_CALLS] token: the model cannot call tools")
        if self.args_id is not None:  # v11+: [TOOL_CALLS]name[ARGS]{arguments}, once per call
            # (mistral-common writes one [TOOL_CALLS] before each call, and the reader reads each)
            calls = [f'"{lark_str(name)}" <[{self.args_id}]> '
                     f'%json {json.dumps(dict(params, **{"x-guidance": json_style}))}'
                     for name, params in functions(tools)]
            call = " | ".join(f"({c})" for c in calls)
            return f"start: (<[{self.tool_calls_id}]> ({call})){'' if one else '+'}"
        # v2-v7: [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]
        call = json_call(tools, json_style, id={"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"})
        more = "" if one else ' (", " call)*'
        return f'start: <[{self.tool_calls_id}]> "[" call{more} "]"\ncall: {call}'


# What the reader is reading.
_TEXT, _CALLS, _ONLY_TEXT, _IGNORED = range(4)


class MistralReader(ToolCallReader):
    """Reads the reply's ids: [TOOL_CALLS] and [ARGS] are special tokens, absent from the text.

    Until the first [TOOL_CALLS], the engine's text streams as content. From there, each
    [TOOL_CALLS] begins a segment of calls (_Segment), decoded on its own. A segment that turns
    out to be no call before any call of the reply began makes the reply text from there on (as
    the engine wrote it, the [TOOL_CALLS] dropped); one that breaks after a call began ends the
    calls: the rest of the reply is ignored. One the reply ends inside of is dropped.

    State: what is being read, the ids before the first [TOOL_CALLS], the engine's text and how
    much of it went out as content, the segment being read and the number of calls so far."""

    def __init__(self, fmt: MistralToolCalls):
        self.fmt, self.tokenizer = fmt, fmt.tokenizer
        self.mode = _TEXT
        self.ids_before: list[int] = []
        self.engine_text = ""
        self.sent = 0  # characters of engine_text that went out as content (or that the calls hold)
        self.segment: _Segment | None = None
        self.next_index = 0

    def feed(self, token_ids: list[int], text: str) -> list[Piece]:
        self.engine_text += text
        out: list[Piece] = []
        for t in token_ids:
            if t in self.tokenizer.stop_token_ids or self.mode in (_ONLY_TEXT, _IGNORED):
                continue
            if self.mode == _TEXT:
                if t == self.fmt.tool_calls_id:
                    self._content_before_calls(out)
                    self._begin_segment()
                else:
                    self.ids_before.append(t)
            elif t == self.fmt.tool_calls_id:
                if self.segment.complete:
                    self._begin_segment()
                else:
                    self._segment_broke(out)
            else:
                out += self.segment.push(t)
                self._after_segment_step(out)
        if self.mode in (_TEXT, _ONLY_TEXT):
            self._engine_content(out)
        return out

    def end(self, cut_off: bool = False) -> list[Piece]:
        out: list[Piece] = []
        if self.mode == _CALLS:
            out += self.segment.end()
            self._after_segment_step(out)
        return out

    # -- where content ends and calls begin --

    def _content_before_calls(self, out: list[Piece]) -> None:
        """The content not yet out: the text of the ids before [TOOL_CALLS] (the engine may still
        hold some of it back, e.g. as the start of a stop string)."""
        before = self.tokenizer.decode(self.ids_before)
        if before.startswith(self.engine_text[: self.sent]) and len(before) > self.sent:
            out.append(Content(before[self.sent:]))
        self.sent = max(self.sent, len(before))

    def _engine_content(self, out: list[Piece]) -> None:
        if len(self.engine_text) > self.sent:
            out.append(Content(self.engine_text[self.sent:]))
            self.sent = len(self.engine_text)

    def _begin_segment(self) -> None:
        self.mode, self.segment = _CALLS, _Segment(self.fmt, self.next_index)

    def _after_segment_step(self, out: list[Piece]) -> None:
        self.next_index = self.segment.next_index
        if self.segment.error:
            self._segment_broke(out)

    def _segment_broke(self, out: list[Piece]) -> None:
        if self.next_index == 0:  # no call began: the reply is text from the first [TOOL_CALLS]
            self.mode = _ONLY_TEXT
            self._engine_content(out)
        else:
            self.mode = _IGNORED


class _Segment:
    """The calls after one [TOOL_CALLS], read as they come: v11+ `name[ARGS]{...}` or
    `name[CALL_ID]id[ARGS]{...}`, else (and on tokenizers without [ARGS]) a JSON call or list of
    calls (JsonCalls). Which one, the first character tells: a list or an object is JSON.

    `error`: not a call (whatever began stays unfinished); `complete`: its calls are whole (only
    whitespace may follow before the next [TOOL_CALLS]).

    State: the part being read (name, id, arguments, or JSON) and its decoder, the text of each
    part, and for arguments the scanner and whether the call began."""

    def __init__(self, fmt: MistralToolCalls, first_index: int):
        self.fmt = fmt
        self.next_index = first_index
        self.error = self.complete = False
        self.part = "start"  # start | json | name | id | args
        self.decoder = StreamDecoder(fmt.tokenizer)
        self.name = self.call_id = ""
        self.json: JsonCalls | None = None
        self.args: JsonScanner | None = None
        self.index: int | None = None  # the call's, once it began
        self.id = ""
        self.args_start: int | None = None  # where the arguments begin in the scanner's text
        self.args_sent = 0  # characters of the arguments streamed

    def push(self, token_id: int) -> list[Piece]:
        if self.error:
            return []
        if token_id in (self.fmt.args_id, self.fmt.call_id_id):
            return self._marker(token_id)
        return self._text(self.decoder.step(token_id))

    def end(self) -> list[Piece]:
        return [] if self.error else self._text(self.decoder.flush())

    def _marker(self, token_id: int) -> list[Piece]:
        """[CALL_ID] or [ARGS]: the name (and the id) are whole."""
        out = self._text(self.decoder.flush())
        is_args = token_id == self.fmt.args_id
        if self.part == "name" or (self.part == "id" and is_args):
            self.part, self.decoder = ("args" if is_args else "id"), StreamDecoder(self.fmt.tokenizer)
            self.args = JsonScanner() if is_args else None
            self.error = not self.name.strip(WHITESPACE)
        else:
            self.error = True
        return out

    def _text(self, text: str) -> list[Piece]:
        if self.error or not text:
            return []
        if self.part == "start":
            head = text.lstrip(WHITESPACE)[:1]
            if not head:
                return []
            self.part = "json" if head in "[{" else "name"
            self.json = JsonCalls(self.next_index) if self.part == "json" else None
            self.error = self.part == "name" and self.fmt.args_id is None  # v2-v7 knows no `name[ARGS]`
        if self.part == "name":
            self.name += text
        elif self.part == "id":
            self.call_id += text
        elif self.part == "json":
            out, rest = self.json.push_text(text)  # once the value is done, all of text is rest
            self.next_index = self.json.next_index
            self.complete = self.json.done and self.json.begun > 0 and not rest.strip(WHITESPACE)
            self.error = self.json.error or (self.json.done and not self.complete)
            return out
        else:
            return self._arguments(text)
        return []

    def _arguments(self, text: str) -> list[Piece]:
        """The arguments of `name[ARGS]{...}`: an object begins the call and streams; a JSON
        string holding one comes whole at its end. Only whitespace may follow them."""
        sc = self.args
        for ch in text:
            if sc.done:
                self.error = ch not in WHITESPACE
            else:
                sc.push(ch)
                if self.args_start is None and sc.events:  # the arguments' first character
                    _, _, _, self.args_start, first = sc.events[0]
                    self.error = first not in '{"'
                self.error |= sc.error
            if self.error:
                return []
        out: list[Piece] = []
        if self.args_start is None:
            return out
        if sc.text[self.args_start] == "{":
            if self.index is None:
                out.append(self._begin())
            new = sc.text[self.args_start + self.args_sent :]
            if new:
                out.append(ArgumentsText(self.index, new))
                self.args_sent += len(new)
        if sc.done and not self.complete:
            out += self._arguments_done(sc.text[self.args_start :])
        return out

    def _arguments_done(self, args: str) -> list[Piece]:
        out: list[Piece] = []
        if not args.startswith("{"):  # a JSON string holding the object
            inner = arguments_in_string(args)
            if inner is None:
                self.error = True
                return out
            out += [self._begin(), ArgumentsText(self.index, inner)]
            args = inner
        self.complete = True
        out.append(CallEnds(self.index, ToolCall(self.id, self.name.strip(WHITESPACE), json.loads(args), args)))
        return out

    def _begin(self) -> CallBegins:
        self.index, self.next_index = self.next_index, self.next_index + 1
        self.id = call_id_or_new(self.call_id.strip(WHITESPACE))
        return CallBegins(self.index, self.id, self.name.strip(WHITESPACE))
