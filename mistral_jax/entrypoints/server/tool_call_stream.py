"""A chat reply offered tools, as OpenAI's API gives it: the tool-call format's reader
(tool_calls.format.ToolCallReader) turns the generated ids into content and calls, here made
into stream deltas (`ToolCallDeltas`) or read whole (`tool_call_message`), with the
finish_reason that tells how the reply ended (`finish_reason`).

Streamed and whole agree by construction (the same reader reads both): the content deltas add up
to the message's content, and each call's argument fragments to its `arguments`, the JSON text
the model wrote. A call that was cut off or broke is not in the whole message; streamed, its
first chunks are out before that shows, and the finish_reason tells ("length" when cut off)."""

from __future__ import annotations

from typing import Any

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.tool_calls import ArgumentsText, CallBegins, CallEnds, Content, Piece, Reply, tool_call_format

Delta = tuple[dict, str | None, dict | None]  # (a chunk's delta, its finish_reason, its logprobs)


def finish_reason(engine_reason: str | None, begun: int, completed: int) -> str | None:
    """The reply's finish_reason: the engine's where no call began; "length" where max_tokens cut
    the reply (a call it was in, or one that might have followed, is not whole); "tool_calls"
    where calls completed and the model stopped; else the engine's (calls began and broke)."""
    if not begun or engine_reason == "length":
        return engine_reason
    return "tool_calls" if completed else engine_reason


def tool_call_message(tokenizer, token_ids: list[int], text: str, engine_reason: str | None,
                      ) -> tuple[dict[str, Any], str | None]:
    """A whole reply offered tools as OpenAI's assistant message, and its finish_reason. Where
    no call was written its content is the reply's text, as without tools."""
    reply: Reply = tool_call_format(tokenizer).read(token_ids, text, cut_off=engine_reason == "length")
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or (None if reply.calls else "")}
    if reply.calls:
        message["tool_calls"] = [c.to_openai() for c in reply.calls]
    return message, finish_reason(engine_reason, reply.begun, len(reply.calls))


class ToolCallDeltas:
    """One streamed choice of a request offered tools: each event's pieces as deltas, in OpenAI's
    (and vLLM's) shape. Content: {"content": text}. A call: once its name is known,
    {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]},
    then {"tool_calls": [{"index", "function": {"arguments": fragment}}]} as its arguments come.
    The last event's content delta, or a delta of its own, carries finish_reason; an event's
    logprobs go with its first delta (an empty one where it has none: every token's logprobs go
    out, as in the whole reply).

    State: the format's reader of this reply, the calls begun and completed."""

    def __init__(self, tokenizer):
        self.reader = tool_call_format(tokenizer).reader()
        self.begun = self.completed = 0

    def step(self, event: StepEvent, logprobs: dict | None) -> list[Delta]:
        pieces = self.reader.feed([] if event.token_id is None else [event.token_id], event.text)
        if event.finished:
            pieces += self.reader.end(cut_off=event.finish_reason == "length")
        deltas = [d for d in map(self._delta, _joined(pieces)) if d is not None]
        out: list[Delta] = [(d, None, None) for d in deltas]
        if logprobs is not None:  # every token's, as the whole reply's logprobs hold them
            out[:1] = [(out[0][0] if out else {}, None, logprobs)]
        if event.finished:  # a call's chunks stay apart from the finish_reason, as OpenAI sends them
            reason = finish_reason(event.finish_reason, self.begun, self.completed)
            if out and "tool_calls" not in out[-1][0]:
                out[-1] = (out[-1][0], reason, out[-1][2])
            else:
                out.append(({}, reason, None))
        return out

    def _delta(self, piece: Piece) -> dict | None:
        if isinstance(piece, Content):
            return {"content": piece.text} if piece.text else None
        if isinstance(piece, CallBegins):
            self.begun += 1
            return {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                    "function": {"name": piece.name, "arguments": ""}}]}
        if isinstance(piece, ArgumentsText):
            return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}
        if isinstance(piece, CallEnds):
            self.completed += 1
        return None


def _joined(pieces: list[Piece]) -> list[Piece]:
    """Consecutive content pieces as one (one event's text, held back and let go, may be several)."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, Content) and out and isinstance(out[-1], Content):
            out[-1] = Content(out[-1].text + p.text)
        else:
            out.append(p)
    return out
