"""The interface of a tool-call format: how one family of models writes tool calls, read as the
reply is generated (a `ToolCallReader` turns it into pieces: content, and calls that begin, stream
their arguments and end) or whole (`read`, `parse`: the same reader over the whole reply, so a
streamed reply and a whole one always agree)."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_jax.tokenizer import Tokenizer
from mistral_jax.tool_calls.call import ToolCall

# ---- what a reader tells ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """Text of the reply that is not a call."""

    text: str


@dataclass(frozen=True)
class CallBegins:
    """Call number `index` (0, 1, ... in the reply): its id and name are known, its arguments
    follow."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsText:
    """More of call `index`'s arguments: its fragments add up to the call's arguments_json."""

    index: int
    text: str


@dataclass(frozen=True)
class CallEnds:
    """Call `index` is whole."""

    index: int
    call: ToolCall


Piece = Content | CallBegins | ArgumentsText | CallEnds


class ToolCallReader:
    """Reads one reply as it is generated. Each call's pieces come in order: CallBegins, then its
    ArgumentsText, then CallEnds where it completes.

    What becomes content: text that is no call, including text that looked like the beginning of
    one and turned out not to be (it is held back while it could still be a call). What does not:
    a call that began, and whatever the reply ended inside of (a call cut off by max_tokens is no
    text, whether or not its name was out yet)."""

    def feed(self, token_ids: list[int], text: str) -> list[Piece]:
        """The pieces of these generated ids, whose text (as the engine streams it: decoded, stop
        strings cut) is `text`."""
        raise NotImplementedError

    def end(self, cut_off: bool = False) -> list[Piece]:
        """The reply is over: what was held back and is content after all. cut_off: max_tokens
        ended it, so a held tail that could begin a call may well have been one (it is dropped);
        otherwise the model ended it, and such a tail is text."""
        raise NotImplementedError


class TextReader(ToolCallReader):
    """A reply that is all text: the reader of a format that reads no calls."""

    def feed(self, token_ids: list[int], text: str) -> list[Piece]:
        return [Content(text)] if text else []

    def end(self, cut_off: bool = False) -> list[Piece]:
        return []


@dataclass
class Reply:
    """A whole reply: its content, the calls that completed, and how many calls began (one that
    began and did not complete was cut off or malformed)."""

    content: str
    calls: list[ToolCall]
    begun: int

    @classmethod
    def of(cls, pieces: list[Piece]) -> Reply:
        return cls("".join(p.text for p in pieces if isinstance(p, Content)),
                   [p.call for p in pieces if isinstance(p, CallEnds)],
                   sum(isinstance(p, CallBegins) for p in pieces))


# ---- the format -------------------------------------------------------------------------------------


class ToolCallFormat:
    """Reading a model's tool calls from its output, and the grammar that makes it write them.

    Invariant: every reply `grammar` allows, `parse` reads back as calls (the server constrains
    a tool_choice "required" or named reply with the one and reads it with the other).
    This base class is also the format of a tokenizer that names none: it reads no calls (its
    replies are text) and has no grammar."""

    name: str | None = None  # vLLM's --tool-call-parser name

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def reader(self) -> ToolCallReader:
        """A reader for one reply (here: all of it is text)."""
        return TextReader()

    def read(self, token_ids: list[int], text: str, cut_off: bool = False) -> Reply:
        """A whole reply: its generated ids (the stop token included or not), its text as the
        engine gave it, and whether max_tokens cut it off (ToolCallReader.end)."""
        return _whole(self.reader(), token_ids, text, cut_off)

    def parse(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        """Generated ids as content text and the calls that completed ([] when there are none)."""
        reader = self.reader()
        stops = self.tokenizer.stop_token_ids
        reply = _whole(reader, token_ids, self.tokenizer.decode([t for t in token_ids if t not in stops]))
        return reply.content, reply.calls

    def grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        """A Lark grammar (llguidance's dialect) for a reply that is only tool calls, with each
        call's arguments under its function's JSON schema. tools: OpenAI function definitions;
        one: exactly one call; json_style: llguidance's JSON formatting options."""
        raise NotImplementedError(f"{type(self.tokenizer).__name__} names no tool-call format")


def _whole(reader: ToolCallReader, token_ids: list[int], text: str, cut_off: bool = False) -> Reply:
    return Reply.of(reader.feed([t for t in token_ids if t is not None], text) + reader.end(cut_off))
