"""/v1/chat/completions: a conversation (and its tools) to n choices, whole or as server-sent
events.

A reply offered tools may turn into tool calls, which its tool-call format reads from the generated
ids as they come (tool_call_stream.py): streamed, each call goes out as it is written; whole or
streamed, the message carries tool_calls and finish_reason is "tool_calls" ("length" where
max_tokens cut the reply)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.constraints import constrained
from mistral_jax.entrypoints.server.context import ServerContext
from mistral_jax.entrypoints.server.events import (
    Result,
    Streams,
    collect_unless_disconnected,
    merged,
    submit,
)
from mistral_jax.entrypoints.server.inputs import (
    as_legacy_function_call,
    chat_messages,
    check_text,
    is_big,
    request_tools,
    templated,
    within_context,
)
from mistral_jax.entrypoints.server.logprobs import chat_logprob
from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest
from mistral_jax.entrypoints.server.request_params import admit, chat_params, seeded
from mistral_jax.entrypoints.server.sse import (
    EventStream,
    failed_stream_end,
    sse,
    stream_end,
)
from mistral_jax.entrypoints.server.tool_call_stream import ToolCallDeltas, tool_call_message
from mistral_jax.entrypoints.server.usage import Usage


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Request):
    """The response to a checked request: a body (dict), or an EventStream when req.stream.
    Every check runs before any job reaches the engine."""
    tools, ids, jobs = await chat_jobs(ctx, req, request)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": ctx.model_name}
    streams = submit(ctx.bridge, jobs, request)
    if req.stream:
        stream = ChatStream(ctx.tokenizer, req, dict(head, object="chat.completion.chunk"), ids, tools)
        return EventStream(stream.lines(streams), streams)
    results = await collect_unless_disconnected(request, streams)
    choices, usage = [], Usage(req.n)
    for (index, _, _), r in zip(jobs, results):
        message, finish = _message(ctx.tokenizer, r, tools)
        if req.functions is not None:  # a legacy request: its call answers as message.function_call
            message, finish = as_legacy_function_call(message, finish)
        logprobs = ({"content": [chat_logprob(ctx.tokenizer, t, d, _top(req)) for t, d in zip(r.token_ids, r.logprobs)]}
                    if req.logprobs else None)
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
        usage.add_result(index, ids, r.token_ids, r.cached)
    return dict(head, choices=choices, usage=usage.body())


async def chat_jobs(ctx: ServerContext, req: ChatCompletionRequest, request: Request):
    """A chat request checked and made into the engine's jobs: (the tools the template shows, the
    prompt ids, the jobs (choice index, ids, params), each with the request's output constraint).
    Every check runs here, before any job reaches the engine. /v1/responses and /v1/messages
    build their jobs here too (responses.py, messages.py), from the chat request theirs amounts
    to, so every endpoint templates, samples and constrains alike."""
    ctx.check_model(req.model)
    tools = request_tools(req)
    check_text(req.stop, "stop")
    check_text(req.tools, "tools")
    ids = within_context(await templated(ctx.tokenizing.encode_chat(chat_messages(req.messages), tools,
                                                                    is_big(request))),
                         "the conversation", ctx.max_model_len)
    params = chat_params(req, ctx.defaults)
    jobs = [(c, ids, admit(ctx.bridge, ids, seeded(params, c), "the conversation", req)) for c in range(req.n)]
    return tools, ids, await constrained(jobs, req, ctx.tokenizer, tools, ctx.vocab_size)


def _message(tokenizer, r: Result, tools) -> tuple[dict[str, Any], str | None]:
    """A whole reply as OpenAI's assistant message, and its finish_reason."""
    if tools:
        return tool_call_message(tokenizer, r.token_ids, r.text, r.finish_reason)
    return {"role": "assistant", "content": r.text}, r.finish_reason


def _top(req: ChatCompletionRequest) -> int:
    """Alternatives per token in logprobs (chat_params checked top_logprobs against logprobs)."""
    return (req.top_logprobs or 0) if req.logprobs else 0


class ChatStream:
    """The server-sent events of a streamed chat completion. Each choice opens with a chunk
    carrying the assistant's role, then one chunk per engine event with its text as content;
    with tools, each choice's ToolCallDeltas decides what its events send.

    State: the usage so far, the choices that have opened and those that have finished (a stream
    that fails midway closes the others with finish_reason "error"), and each choice's tool-call
    state."""

    def __init__(self, tokenizer, req: ChatCompletionRequest, head: dict, prompt_ids: list[int], tools):
        self.tokenizer, self.head, self.prompt_ids, self.tools = tokenizer, head, prompt_ids, tools
        self.n, self.logprobs, self.top, self.stream_options = req.n, req.logprobs, _top(req), req.stream_options
        self.usage = Usage(req.n)
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.tool_calls: dict[int, ToolCallDeltas] = {}

    async def lines(self, streams: Streams) -> AsyncIterator[str]:
        try:
            async for index, event in merged(streams):
                for line in self.on_event(index, event):
                    yield line
            for line in stream_end(self.head, self.usage, self.stream_options):
                yield line
        except (EngineStopped, RequestFailed) as e:
            open_choices = [self.chunk(i, {}, "error") for i in range(self.n) if i not in self.finished]
            for line in failed_stream_end(e, open_choices):
                yield line

    def on_event(self, index: int, event: StepEvent) -> list[str]:
        """The chunks for one of choice `index`'s events."""
        if event.finished:
            self.finished.add(index)
        out = []
        if index not in self.started:
            self.started.add(index)
            out.append(self.chunk(index, {"role": "assistant", "content": ""}))
        self.usage.add_event(index, self.prompt_ids, event)
        lps = {"content": [chat_logprob(self.tokenizer, event.token_id, event.logprobs, self.top)]} \
            if self.logprobs else None
        if self.tools:
            deltas = self.tool_calls.get(index)
            if deltas is None:
                deltas = self.tool_calls[index] = ToolCallDeltas(self.tokenizer)
            out += [self.chunk(index, delta, finish, logprobs) for delta, finish, logprobs in deltas.step(event, lps)]
        else:
            out.append(self.chunk(index, {"content": event.text} if event.text else {},
                                  event.finish_reason if event.finished else None, lps))
        return out

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse(dict(self.head, choices=[{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]))
