"""/v1/messages: Anthropic's Messages API, served by the chat-completions path.

A request is read as the chat completion it means (`chat_request`): `system` becomes a system
message; a text block, the text of its message (a message's text blocks join as a chat
message's text parts do, with nothing between them); an assistant's tool_use block, a tool call
whose arguments are its input as JSON; a user's tool_result block, a tool message answering that
call; tools become functions (input_schema their parameters), tool_choice OpenAI's (any:
"required"; tool: that function; disable_parallel_tool_use: parallel_tool_calls false),
stop_sequences the stop strings, and output_config.format (a JSON schema) the response_format
that constrains the reply to it. chat.chat_jobs then templates, checks and constrains it as it
does a chat completion, so a greedy request gives the same text on either API.

A reply is read by the model's tool-call format (the reader chat completions use) into content
blocks (`Blocks`): text blocks and tool_use blocks, in the order the model wrote them, sent as
Anthropic's stream events or returned whole. Both come from the same pieces, so they agree: a
stream's text deltas add up to the whole reply's text blocks, and each tool_use block's
partial_json fragments to the JSON text whose value is the whole reply's `input`. A call that
did not complete (cut off by max_tokens, or malformed) is not in the whole reply; streamed, its
block has gone out before that shows, and stop_reason tells ("max_tokens" where it was cut off).

stop_reason: "tool_use" where calls completed and the model stopped, "max_tokens" where
max_tokens cut the reply, "stop_sequence" (with stop_sequence) where one of stop_sequences ended
it, else "end_turn". usage follows Anthropic's sum: input_tokens + cache_read_input_tokens is
the prompt's length, the second the part the prefix cache served (known when the reply ends: a
stream's message_start counts the whole prompt as input_tokens, its message_delta the split).

Refused with a 400 whose message starts with the field's path: image and document blocks (the
server runs text models), server tools (a tool needs a name and an input_schema), blocks in the
wrong role, a missing max_tokens. Errors come as Anthropic's error object (errors.py), streams
end in its `error` event where the engine fails midway."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.chat import chat_jobs
from mistral_jax.entrypoints.server.constraints import ConstraintError
from mistral_jax.entrypoints.server.context import ServerContext, context_of
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.events import Streams, collect_unless_disconnected, merged, submit
from mistral_jax.entrypoints.server.inputs import chat_messages, check_text, is_big, request_tools, templated
from mistral_jax.entrypoints.server.messages_protocol import (
    AnthropicErrorResponse,
    CountTokensRequest,
    MessagesRequest,
    anthropic_error_body,
)
from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest
from mistral_jax.entrypoints.server.sse import EventStream
from mistral_jax.entrypoints.server.tool_call_stream import finish_reason
from mistral_jax.entrypoints.server.usage import Usage
from mistral_jax.tool_calls import ArgumentsText, CallBegins, CallEnds, Content, Piece, tool_call_format
from mistral_jax.tool_calls.format import TextReader

# Request fields of the chat completion whose errors name them, by their name here.
_FIELDS = {"stop": "stop_sequences", "response_format": "output_config.format"}

router = APIRouter()

# The responses as sent (the OpenAPI document): errors are Anthropic's error object, streams
# Anthropic's named events.
_ERRORS = {"default": {"model": AnthropicErrorResponse, "description": "Anthropic's error object"}}
_BAD_INPUT = {400: {"model": AnthropicErrorResponse, "description": "the request cannot be served as sent: the "
                                                                   "message starts with the field"}, **_ERRORS}
_SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"type": "string", "description": "the event's type (message_start, content_block_delta, ...)"},
    "data": {"type": "string", "description": "the event as JSON"}}}
_STREAMED = {200: {"description": "Anthropic's message; with `stream: true`, its server-sent events",
                   "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}}}, **_BAD_INPUT}


@router.post("/v1/messages", responses=_STREAMED)
async def messages(req: MessagesRequest, request: Request):
    return await create_message(context_of(request), req, request)


@router.post("/v1/messages/count_tokens", responses=_BAD_INPUT)
async def count_tokens(req: CountTokensRequest, request: Request):
    return await count_message_tokens(context_of(request), req, request)


async def create_message(ctx: ServerContext, req: MessagesRequest, request: Request):
    """The response to a checked request: Anthropic's message (a dict), or an EventStream of its
    events when req.stream. Every check runs before any job reaches the engine."""
    chat = chat_request(req)
    try:
        tools, ids, jobs = await chat_jobs(ctx, chat, request)
    except BadRequest as e:
        raise _renamed(e.message, e.param, e.status, e.type) from None
    except ConstraintError as e:
        raise _renamed(str(e), e.param) from None
    head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": ctx.model_name}
    blocks = Blocks(ctx.tokenizer, tools, req.stop_sequences or [])
    streams = submit(ctx.bridge, jobs, request)
    if req.stream:
        return EventStream(message_events(head, blocks, ids, streams), streams)
    (r,) = await collect_unless_disconnected(request, streams)
    blocks.step(r.token_ids, r.text, True, r.finish_reason)
    usage = Usage()
    usage.add_result(0, ids, r.token_ids, r.cached)
    stop_reason, stop_sequence = blocks.stop_reason(r.finish_reason)
    return dict(head, content=blocks.whole(), stop_reason=stop_reason, stop_sequence=stop_sequence,
                usage=_usage(usage))


async def count_message_tokens(ctx: ServerContext, req: CountTokensRequest, request: Request) -> dict:
    """/v1/messages/count_tokens: the prompt's length, as a message request with the same
    messages, system and tools would have it (its input_tokens with nothing cached)."""
    chat = chat_request(req)
    ctx.check_model(chat.model)
    try:
        tools = request_tools(chat)
        ids = await templated(ctx.tokenizing.encode_chat(chat_messages(chat.messages), tools, is_big(request)))
    except BadRequest as e:
        raise _renamed(e.message, e.param, e.status, e.type) from None
    return {"input_tokens": len(ids)}


def _usage(usage: Usage) -> dict:
    return {"input_tokens": usage.prompt - usage.cached, "output_tokens": usage.completion,
            "cache_read_input_tokens": usage.cached}


def _renamed(message: str, param: str | None, status: int = 400, type_="invalid_request_error") -> BadRequest:
    """A refusal of the chat completion's field, in the name the request gave it."""
    if param in _FIELDS:
        message, param = f"{_FIELDS[param]}: {message}", _FIELDS[param]
    return BadRequest(message, param, status, type_)


# ---- the request, as a chat completion ------------------------------------------------------------


def chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat completion a Messages request means (see the module's docstring). Text is checked
    here, under the request's own field names, before the chat path checks it again."""
    check_text(req.system, "system")
    check_text(req.messages, "messages")
    check_text(req.tools, "tools")
    system = _system_text(req.system)
    messages = ([{"role": "system", "content": system}] if system else []) + _chat_messages(req.messages)
    tools = [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools is not None else None
    tool_choice, parallel = _tool_choice(req.tool_choice)
    generation = {}  # a count_tokens request's other fields are no part of the prompt: not read
    if isinstance(req, MessagesRequest):
        check_text(req.stop_sequences, "stop_sequences")
        generation = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          stop=req.stop_sequences or None, response_format=_output_format(req.output_config))
    return ChatCompletionRequest(model=req.model, messages=messages, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel, **generation)


def _output_format(config: dict | None) -> dict | None:
    """output_config.format (Anthropic's structured outputs: {"type": "json_schema", "schema": ...})
    as response_format, which constrains the reply to the schema; output_config's other keys
    (effort) are for Anthropic's models and ignored."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format must be {'type': 'json_schema', 'schema': {...}}",
                         "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _system_text(system) -> str:
    """`system` as one text: a string, or text blocks (joined by a blank line: they are separate
    instructions, as clients such as Claude Code send them)."""
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequest(f"system.{i} must be a text block {{'type': 'text', 'text': ...}}", "system")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _blocks(content, where: str) -> list[dict]:
    """A message's content as blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of content blocks", where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{where}.{j} must be a content block {{'type': ..., ...}}", f"{where}.{j}")
    return content


def _merged_turns(messages: list[dict]) -> list[tuple[str, list[tuple[str, dict]]]]:
    """Consecutive messages of one role as one turn, as Anthropic's API combines them: (role,
    [(the block's path, block)])."""
    turns: list[tuple[str, list[tuple[str, dict]]]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role must be 'user' or 'assistant' (the system prompt goes in "
                             "`system`)", f"messages.{i}.role")
        where = f"messages.{i}.content"
        blocks = [(f"{where}.{j}", b) for j, b in enumerate(_blocks(m.get("content"), where))]
        if turns and turns[-1][0] == m["role"]:
            turns[-1][1].extend(blocks)
        else:
            turns.append((m["role"], blocks))
    return turns


def _chat_messages(messages: list[dict]) -> list[dict]:
    """Anthropic's turns as OpenAI's messages: a user turn's tool_result blocks become tool
    messages and its text a user message, in the order given; an assistant turn becomes one
    assistant message (its text and its tool calls; thinking blocks, which no template shows,
    are left out)."""
    out: list[dict] = []
    for role, blocks in _merged_turns(messages):
        parts: list[dict] = []
        calls: list[dict] = []
        for where, block in blocks:
            kind = block["type"]
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise BadRequest(f"{where}.text must be a string", where)
                parts.append({"type": "text", "text": block["text"]})
            elif kind in ("image", "document"):
                raise BadRequest(f"{where}: {kind} blocks are not served: this server runs text models "
                                 "(send text blocks)", where)
            elif role == "assistant" and kind == "tool_use":
                calls.append(_tool_call(block, where))
            elif role == "assistant" and kind in ("thinking", "redacted_thinking"):
                continue
            elif role == "user" and kind == "tool_result":
                if parts:
                    out.append({"role": "user", "content": parts})
                    parts = []
                out.append(_tool_message(block, where))
            else:
                raise BadRequest(f"{where}: a {role} message cannot hold a {kind!r} block (a user's are text and "
                                 "tool_result, an assistant's text and tool_use)", where)
        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        elif parts or not blocks:
            out.append({"role": "user", "content": parts})
    return out


def _tool_call(block: dict, where: str) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise BadRequest(f"{where}: a tool_use block needs an 'id' and a 'name' (strings)", where)
    args = block.get("input", {})
    if not isinstance(args, dict):
        raise BadRequest(f"{where}.input must be an object (the call's arguments)", where)
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _tool_message(block: dict, where: str) -> dict:
    """A tool_result as a tool message. Its content is a string or text blocks; is_error has no
    place in chat templates, so the text says it ("Error: " first)."""
    if not isinstance(block.get("tool_use_id"), str):
        raise BadRequest(f"{where}.tool_use_id must be the id of the tool_use block it answers", where)
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.content.{k}: a tool result's content blocks must be text blocks "
                                 "(this server runs text models)", where)
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text blocks", where)
    if block.get("is_error") is True:
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _tool(tool, i: int) -> dict:
    """A custom tool as an OpenAI function. Server tools (web_search, bash, text_editor, ...) run on
    Anthropic's side, which this server is not."""
    where = f"tools.{i}"
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise BadRequest(f"{where}: server tools ({kind!r}) are not served here: give custom tools, each "
                         "{'name': ..., 'input_schema': {...}}", "tools")
    if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
        raise BadRequest(f"{where}: a tool needs a 'name' (a string) and an 'input_schema' (a JSON schema)", "tools")
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict | None) -> tuple[str | dict | None, bool | None]:
    """Anthropic's tool_choice as OpenAI's, and parallel_tool_calls."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") is True else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice: {'type': 'tool'} needs the tool's 'name'", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise BadRequest(f"tool_choice type {kind!r} is not one of 'auto', 'any', 'tool', 'none'", "tool_choice")
    return mapped, parallel


# ---- the reply, as content blocks -----------------------------------------------------------------


class Blocks:
    """One reply's content blocks, built from the pieces its reader gives (all text where no tools
    were offered), as the stream events that build them (`step`) and whole (`whole`).

    State: the reader, the blocks so far (the last one open until another starts or the reply
    ends; a tool_use block's input is the call's arguments once the call ends), the block of
    each call, the blocks whose calls completed, the calls begun and completed, and the ids and
    text generated (for the stop sequence)."""

    def __init__(self, tokenizer, tools, stop_sequences: list[str]):
        self.tokenizer, self.stop_sequences = tokenizer, stop_sequences
        self.reader = tool_call_format(tokenizer).reader() if tools else TextReader()
        self.content: list[dict] = []
        self.open = False
        self.call_blocks: dict[int, int] = {}
        self.completed_blocks: set[int] = set()
        self.begun = self.completed = 0
        self.token_ids: list[int] = []
        self.text = ""

    def step(self, token_ids: list[int | None], text: str, finished: bool, engine_reason: str | None) -> list[dict]:
        """The events of these generated ids, whose text is `text`; the reply's last step closes
        its open block."""
        ids = [t for t in token_ids if t is not None]
        self.token_ids += ids
        self.text += text
        pieces = self.reader.feed(ids, text)
        if finished:
            pieces += self.reader.end(cut_off=engine_reason == "length")
        events = [e for p in pieces for e in self._events(p)]
        if finished and self.open:
            events.append(self._stop())
        return events

    def whole(self) -> list[dict]:
        """The reply's content: its text blocks and the tool_use blocks of completed calls."""
        return [b for i, b in enumerate(self.content) if b["type"] == "text" or i in self.completed_blocks]

    def stop_reason(self, engine_reason: str | None) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of the ended reply."""
        reason = finish_reason(engine_reason, self.begun, self.completed)
        if reason == "tool_calls":
            return "tool_use", None
        if reason == "length":
            return "max_tokens", None
        sequence = self._stop_sequence()
        return ("stop_sequence", sequence) if sequence is not None else ("end_turn", None)

    def _stop_sequence(self) -> str | None:
        """The stop sequence that ended the reply, if one did. The engine cuts the text where a stop
        string begins: the ids' whole text goes on with it there (a reply the model ended with
        its end-of-turn token has no text past its own)."""
        if not self.stop_sequences:
            return None
        full = self.tokenizer.decode([t for t in self.token_ids if t not in self.tokenizer.stop_token_ids])
        return next((s for s in self.stop_sequences if full.startswith(s, len(self.text))), None)

    def _events(self, piece: Piece) -> list[dict]:
        if isinstance(piece, Content):
            if not piece.text:
                return []
            out = [] if self.open and self.content[-1]["type"] == "text" else self._start({"type": "text", "text": ""})
            self.content[-1]["text"] += piece.text
            return out + [self._delta(len(self.content) - 1, {"type": "text_delta", "text": piece.text})]
        if isinstance(piece, CallBegins):
            self.begun += 1
            out = self._start({"type": "tool_use", "id": f"toolu_{piece.id}", "name": piece.name, "input": {}})
            self.call_blocks[piece.index] = len(self.content) - 1
            return out
        if isinstance(piece, ArgumentsText):
            index = self.call_blocks[piece.index]
            return [self._delta(index, {"type": "input_json_delta", "partial_json": piece.text})] if piece.text else []
        if isinstance(piece, CallEnds):
            self.completed += 1
            index = self.call_blocks[piece.index]
            self.content[index]["input"] = piece.call.arguments
            self.completed_blocks.add(index)
            if self.open and index == len(self.content) - 1:
                return [self._stop()]
        return []

    def _start(self, block: dict) -> list[dict]:
        out = [self._stop()] if self.open else []
        self.content.append(block)
        self.open = True
        return out + [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}]

    def _stop(self) -> dict:
        self.open = False
        return {"type": "content_block_stop", "index": len(self.content) - 1}

    @staticmethod
    def _delta(index: int, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": index, "delta": delta}


def event(body: dict) -> str:
    """One of Anthropic's server-sent events: its type as the event's name, the body as its data."""
    return f"event: {body['type']}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


async def message_events(head: dict, blocks: Blocks, prompt_ids: list[int], streams: Streams) -> AsyncIterator[str]:
    """A streamed message, as the anthropic client's stream helper accumulates it: message_start
    (the message without content), each block's content_block_start, deltas and
    content_block_stop, then message_delta (stop_reason, stop_sequence, usage) and message_stop.
    Where the engine stops or the request fails midway, Anthropic's `error` event ends it."""
    usage = Usage()
    start = dict(head, content=[], stop_reason=None, stop_sequence=None,
                 usage={"input_tokens": len(prompt_ids), "output_tokens": 0})
    yield event({"type": "message_start", "message": start})
    try:
        async for _, step in merged(streams):
            usage.add_event(0, prompt_ids, step)
            for body in blocks.step([step.token_id], step.text, step.finished, step.finish_reason):
                yield event(body)
            if step.finished:
                stop_reason, stop_sequence = blocks.stop_reason(step.finish_reason)
                yield event({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                                "stop_sequence": stop_sequence},
                             "usage": _usage(usage)})
                yield event({"type": "message_stop"})
    except (EngineStopped, RequestFailed) as e:
        status = getattr(e, "status", 503)
        yield event(anthropic_error_body(status, str(e), None,
                                         "server_error" if status >= 500 else "invalid_request_error"))
