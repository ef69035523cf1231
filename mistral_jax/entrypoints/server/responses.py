"""/v1/responses: OpenAI's Responses API over the chat-completions path, whole or as its typed
server-sent events; GET /v1/responses/{id} gives a stored response back.

A request becomes the chat request it amounts to (responses_protocol.py) and the engine's jobs
through chat.chat_jobs, so it is checked, templated, sampled and constrained as a chat completion
is: the same conversation gives the same greedy text on both routes. The reply is read by the
same tool-call reader as chat's, into Responses output items (`OutputItems`): a `message` item
with one `output_text` part for the text, a `function_call` item per call. Whole and streamed
responses build their items with the one OutputItems (whole: every piece at once), so they
agree by construction; the stream's events add up to the final response's output.

A response ends `completed`, or `incomplete` with incomplete_details.reason "max_output_tokens"
where the token limit cut it (its open message item is then `incomplete` too). A call that began
and never completed (cut off, or malformed) is no output item of the final response, as it is no
tool call of a chat message; streamed, its item was added before that showed, and is done with
status `incomplete`. A stream whose engine stopped or whose request failed ends with
`response.failed` (status "failed", its error) after closing the open items.

previous_response_id: finished responses (completed or incomplete; not when `store` is false)
are kept in memory, the latest STORE_CAPACITY of them, with their conversation's items (the
previous ones, this input's, this output). A later request naming one continues that
conversation: its items, then the new input, after the new request's own instructions (a
previous response's instructions do not carry over, as in OpenAI's API). The store belongs to
one HTTP process: with several (--api-server-count), a response kept by one is unknown to the
others, and naming it there is a 404 that says so. Nothing survives a restart."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.chat import chat_jobs
from mistral_jax.entrypoints.server.constraints import ConstraintError
from mistral_jax.entrypoints.server.context import ServerContext, context_of
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.events import Streams, collect_unless_disconnected, merged, submit
from mistral_jax.entrypoints.server.responses_protocol import (
    ResponsesRequest,
    call_names,
    chat_messages_of,
    chat_request,
    input_items,
    refuse_unsupported,
    renamed,
)
from mistral_jax.entrypoints.server.routes import _ERRORS, _STREAMED
from mistral_jax.entrypoints.server.sse import EventStream
from mistral_jax.entrypoints.server.usage import Usage
from mistral_jax.tool_calls import ArgumentsText, CallBegins, CallEnds, Content, Piece, tool_call_format
from mistral_jax.tool_calls.format import TextReader

STORE_CAPACITY = 4096

router = APIRouter()


@router.post("/v1/responses", responses=_STREAMED)
async def responses(req: ResponsesRequest, request: Request):
    return await create_response(context_of(request), req, request)


@router.get("/v1/responses/{response_id}", responses=_ERRORS)
async def retrieve_response(response_id: str, request: Request):
    """A stored response, as it was returned (see ResponseStore for which are kept, and where)."""
    return store_of(request).get(response_id, "response_id").body


async def create_response(ctx: ServerContext, req: ResponsesRequest, request: Request):
    """The response to a checked request: a body (dict), or an EventStream when req.stream.
    Every check runs before any job reaches the engine."""
    refuse_unsupported(req)
    store = store_of(request)
    previous = store.get(req.previous_response_id, "previous_response_id") if req.previous_response_id else None
    before = previous.items if previous else []
    new = input_items(req.input)
    names = call_names(before + new)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) \
        + chat_messages_of(before, names, "previous_response_id") + chat_messages_of(new, names)
    chat = chat_request(req, messages)
    try:
        tools, ids, jobs = await chat_jobs(ctx, chat, request)
    except (BadRequest, ConstraintError) as e:
        raise renamed(e) from None
    params = jobs[0][2]
    head = {"id": f"resp_{secrets.token_hex(24)}", "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": ctx.model_name, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": req.store is not False,
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "truncation": "disabled",
            "metadata": req.metadata or {}, "background": False, "usage": None}

    def keep(body: dict, output: list[dict]) -> None:
        if req.store is not False:
            store.put(body, before + new + output)

    streams = submit(ctx.bridge, jobs, request)
    if req.stream:
        return EventStream(ResponseStream(ctx.tokenizer, head, ids, tools, keep).lines(streams), streams)
    (r,) = await collect_unless_disconnected(request, streams)
    items = OutputItems()
    reader = _reader(ctx.tokenizer, tools)
    items.add(reader.feed([t for t in r.token_ids if t is not None], r.text) + reader.end(r.finish_reason == "length"))
    items.close(r.finish_reason)
    usage = Usage()
    usage.add_result(0, ids, r.token_ids, r.cached)
    body = finished(head, items.output(), r.finish_reason, usage)
    keep(body, items.output())
    return body


def _reader(tokenizer, tools):
    """The reader of a reply: the model's tool-call format where tools were offered (as chat's
    ToolCallDeltas and tool_call_message read it), else all text."""
    return tool_call_format(tokenizer).reader() if tools else TextReader()


def finished(head: dict, output: list[dict], finish_reason: str | None, usage: Usage) -> dict:
    """The response at its end: completed, or incomplete where the token limit cut it."""
    cut = finish_reason == "length"
    u = usage.body()
    return dict(head, status="incomplete" if cut else "completed", completed_at=None if cut else int(time.time()),
                incomplete_details={"reason": "max_output_tokens"} if cut else None, output=output,
                usage={"input_tokens": u["prompt_tokens"],
                       "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                       "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": u["total_tokens"]})


class OutputItems:
    """A reply's output items, built from the tool-call reader's pieces; each step returns the
    stream events it makes (without sequence numbers).

    Text goes to the open `message` item (one is added, with its output_text part, at the first
    text after none or after a call); a call is a `function_call` item from its CallBegins (name
    and call_id known) to its CallEnds, its arguments growing with each ArgumentsText. Invariant:
    every item added is done exactly once (close() does the open ones), and the text deltas and
    argument deltas of an item add up to its final text and arguments.

    State: every item added, in order (its output_index is its place here), the open message's,
    and the open calls' (by the reader's call index)."""

    def __init__(self):
        self.items: list[dict] = []
        self.index: dict[str, int] = {}  # item id -> output_index
        self.message: dict | None = None
        self.calls: dict[int, dict] = {}

    def add(self, pieces: list[Piece]) -> list[dict]:
        out: list[dict] = []
        for p in pieces:
            if isinstance(p, Content) and p.text:
                if self.message is None:
                    out += self._open_message()
                self.message["content"][0]["text"] += p.text
                out.append(self._text_event("response.output_text.delta", self.message, delta=p.text))
            elif isinstance(p, CallBegins):
                out += self._close_message("completed")
                item = {"id": f"fc_{secrets.token_hex(24)}", "type": "function_call", "status": "in_progress",
                        "call_id": p.id, "name": p.name, "arguments": ""}
                self.calls[p.index] = item
                out.append(self._added(item))
            elif isinstance(p, ArgumentsText) and p.index in self.calls:
                item = self.calls[p.index]
                item["arguments"] += p.text
                out.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                            "output_index": self.index[item["id"]], "delta": p.text})
            elif isinstance(p, CallEnds) and p.index in self.calls:
                out += self._close_call(self.calls.pop(p.index), "completed")
        return out

    def close(self, finish_reason: str | None) -> list[dict]:
        """The reply is over (finish_reason None: it failed): the open items are done (a message
        the token limit cut or a failure ended is `incomplete`; a call still open never
        completed). A reply that made no item at all gets an empty message, as a chat reply's
        content is "" then."""
        out = [] if self.items or finish_reason is None else self._open_message()
        out += self._close_message("incomplete" if finish_reason in ("length", None) else "completed")
        for index in sorted(self.calls):
            out += self._close_call(self.calls.pop(index), "incomplete")
        return out

    def output(self) -> list[dict]:
        """The final response's output: every item but the calls that never completed."""
        return [i for i in self.items if i["type"] != "function_call" or i["status"] == "completed"]

    def _open_message(self) -> list[dict]:
        self.message = {"id": f"msg_{secrets.token_hex(24)}", "type": "message", "status": "in_progress",
                        "role": "assistant", "content": []}
        added = self._added(self.message)
        self.message["content"].append(_text_part(""))
        return [added, self._text_event("response.content_part.added", self.message, part=_text_part(""))]

    def _close_message(self, status: str) -> list[dict]:
        message, self.message = self.message, None
        if message is None:
            return []
        message["status"] = status
        text = message["content"][0]["text"]
        return [self._text_event("response.output_text.done", message, text=text),
                self._text_event("response.content_part.done", message, part=_text_part(text)),
                self._done(message)]

    def _close_call(self, item: dict, status: str) -> list[dict]:
        item["status"] = status
        return [{"type": "response.function_call_arguments.done", "item_id": item["id"],
                 "output_index": self.index[item["id"]], "arguments": item["arguments"]}, self._done(item)]

    def _added(self, item: dict) -> dict:
        self.index[item["id"]] = len(self.items)
        self.items.append(item)
        return {"type": "response.output_item.added", "output_index": self.index[item["id"]], "item": _copy(item)}

    def _done(self, item: dict) -> dict:
        return {"type": "response.output_item.done", "output_index": self.index[item["id"]], "item": _copy(item)}

    def _text_event(self, kind: str, message: dict, **fields) -> dict:
        event = {"type": kind, "item_id": message["id"], "output_index": self.index[message["id"]],
                 "content_index": 0, **fields}
        if kind in ("response.output_text.delta", "response.output_text.done"):
            event["logprobs"] = []
        return event


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def _copy(item: dict) -> dict:
    """An item as it stands now (the item itself goes on changing)."""
    return json.loads(json.dumps(item))


class ResponseStream:
    """The server-sent events of a streamed response: response.created and response.in_progress,
    then OutputItems' events as the reply comes, then response.completed or response.incomplete
    (the whole response, as a non-streamed request returns it), or response.failed where the
    engine stopped or the request failed. Every event carries its type (also as the SSE `event:`
    line) and a sequence_number, 0, 1, 2, ... in the order sent."""

    def __init__(self, tokenizer, head: dict, prompt_ids: list[int], tools, keep):
        self.head, self.prompt_ids, self.keep = head, prompt_ids, keep
        self.reader = _reader(tokenizer, tools)
        self.items = OutputItems()
        self.usage = Usage()
        self.sequence = 0

    async def lines(self, streams: Streams) -> AsyncIterator[str]:
        yield self.event({"type": "response.created", "response": self.head})
        yield self.event({"type": "response.in_progress", "response": self.head})
        finish_reason = None
        try:
            async for _, event in merged(streams):
                self.usage.add_event(0, self.prompt_ids, event)
                pieces = self.reader.feed([] if event.token_id is None else [event.token_id], event.text)
                if event.finished:
                    finish_reason = event.finish_reason
                    pieces += self.reader.end(cut_off=finish_reason == "length")
                for e in self.items.add(pieces):
                    yield self.event(e)
        except (EngineStopped, RequestFailed) as e:
            for item_event in self.items.close(None):
                yield self.event(item_event)
            status = getattr(e, "status", 503)
            error = {"code": "server_error" if status >= 500 else "invalid_prompt", "message": str(e)}
            yield self.event({"type": "response.failed", "response": dict(
                self.head, status="failed", error=error, output=self.items.output())})
            return
        for e in self.items.close(finish_reason):
            yield self.event(e)
        body = finished(self.head, self.items.output(), finish_reason, self.usage)
        self.keep(body, self.items.output())
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        yield self.event({"type": kind, "response": body})

    def event(self, body: dict) -> str:
        body = dict(body, sequence_number=self.sequence)
        self.sequence += 1
        return f"event: {body['type']}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


class Stored:
    def __init__(self, body: dict, items: list[dict]):
        self.body, self.items = body, items


class ResponseStore:
    """The finished responses of this HTTP process, for previous_response_id and GET
    /v1/responses/{id}: the latest `capacity` kept or used (least recently used first out). Each
    holds the response's body and its conversation's items (a conversation is at most the
    model's context: a longer one is refused before it is answered, so never kept)."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._kept: OrderedDict[str, Stored] = OrderedDict()

    def put(self, body: dict, items: list[dict]) -> None:
        self._kept[body["id"]] = Stored(body, items)
        self._kept.move_to_end(body["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str, param: str) -> Stored:
        found = self._kept.get(response_id)
        if found is None:
            raise BadRequest(f"response {response_id!r} is not stored here. Responses are kept in memory by the HTTP "
                             f"process that answered them (the latest {self.capacity}, unless sent with store false; "
                             "none survive a restart): with several HTTP processes (--api-server-count) another "
                             "one may hold it. Send the whole conversation as input instead", param, 404,
                             "not_found_error")
        self._kept.move_to_end(response_id)
        return found


def store_of(request: Request) -> ResponseStore:
    """The app's ResponseStore (one per app, made on first use)."""
    state = request.app.state
    store = getattr(state, "response_store", None)
    if store is None:
        store = state.response_store = ResponseStore()
    return store
