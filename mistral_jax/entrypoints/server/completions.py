"""/v1/completions: prompts (text or token ids) to choices, whole or as server-sent events.

Choices are numbered index = prompt * n + c, for c < n choices per prompt; jobs[index] is that
choice's (index, prompt ids, params). max_tokens=0 with echo scores the prompt only: the engine
runs one token, which the response leaves out (its finish_reason is "length")."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Request

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.constraints import constrained
from mistral_jax.entrypoints.server.context import ServerContext
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.events import (
    Streams,
    collect_unless_disconnected,
    merged,
    submit,
)
from mistral_jax.entrypoints.server.inputs import (
    check_text,
    completion_prompts,
    is_big,
    within_context,
)
from mistral_jax.entrypoints.server.logprobs import completion_logprobs
from mistral_jax.entrypoints.server.protocol import CompletionRequest
from mistral_jax.entrypoints.server.request_params import (
    admit,
    completion_params,
    seeded,
)
from mistral_jax.entrypoints.server.sse import (
    EventStream,
    failed_stream_end,
    sse,
    stream_end,
)
from mistral_jax.entrypoints.server.usage import Usage


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request):
    """The response to a checked request: a body (dict), or an EventStream when req.stream.
    Every check runs before any job reaches the engine."""
    ctx.check_model(req.model)
    if req.suffix is not None:
        raise BadRequest("suffix is not supported (no fill-in-the-middle here): remove it", "suffix")
    check_text(req.prompt, "prompt")
    check_text(req.stop, "stop")
    prompts = [(text, within_context(ids, f"prompt {i}", ctx.max_model_len))
               for i, (text, ids) in enumerate(await completion_prompts(ctx.tokenizing, req.prompt, is_big(request)))]
    params, score_only = completion_params(req, ctx.defaults)
    jobs = [(i * req.n + c, ids, admit(ctx.bridge, ids, seeded(params, c), f"prompt {i}", req))
            for i, (_, ids) in enumerate(prompts) for c in range(req.n)]
    jobs = await constrained(jobs, req, ctx.tokenizer, None, ctx.vocab_size)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": ctx.model_name}
    streams = submit(ctx.bridge, jobs, request)
    if req.stream:
        return EventStream(CompletionStream(ctx.tokenizer, req, head, jobs, score_only).lines(streams), streams)
    results = await collect_unless_disconnected(request, streams)
    choices, usage = [], Usage(req.n)
    for (index, ids, _), r in zip(jobs, results):
        generated, generated_lps, text = ([], [], "") if score_only else (r.token_ids, r.logprobs, r.text)
        prompt_text = prompts[index // req.n][0]
        echoed = (prompt_text if prompt_text is not None else ctx.tokenizer.decode(ids)) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            echo_pairs = list(zip(ids, r.prompt_logprobs or [None] * len(ids))) if req.echo else []
            logprobs = completion_logprobs(ctx.tokenizer, echo_pairs + list(zip(generated, generated_lps)))
        choices.append({"index": index, "text": echoed + text,
                        "finish_reason": "length" if score_only else r.finish_reason, "logprobs": logprobs})
        usage.add_result(index, ids, generated, r.cached)
    return dict(head, choices=choices, usage=usage.body())


class CompletionStream:
    """The server-sent events of a streamed completion: one chunk per engine event, each naming
    its choice; a score-only choice sends one chunk (the echoed prompt, or "") when its token ends.

    State: the usage so far, and the choices that have finished (a stream that fails midway closes
    the others with finish_reason "error")."""

    def __init__(self, tokenizer, req: CompletionRequest, head: dict, jobs, score_only: bool):
        self.tokenizer, self.head, self.score_only = tokenizer, head, score_only
        self.n, self.echo, self.logprobs, self.stream_options = req.n, req.echo, req.logprobs, req.stream_options
        self.prompt_ids = [ids for _, ids, _ in jobs]  # by choice index
        self.usage = Usage(req.n)
        self.finished: set[int] = set()

    async def lines(self, streams: Streams) -> AsyncIterator[str]:
        try:
            async for index, event in merged(streams):
                line = self.on_event(index, event)
                if line is not None:
                    yield line
        except (EngineStopped, RequestFailed) as e:
            open_choices = [self.chunk(i, "", "error") for i in range(len(self.prompt_ids)) if i not in self.finished]
            for line in failed_stream_end(e, open_choices):
                yield line
            return
        for line in stream_end(self.head, self.usage, self.stream_options):
            yield line

    def on_event(self, index: int, event: StepEvent) -> str | None:
        """The chunk for one of choice `index`'s events, if it gets one."""
        ids = self.prompt_ids[index]
        if event.finished:
            self.finished.add(index)
        if self.score_only:
            if not event.finished:
                return None
            self.usage.add_result(index, ids, [], event.num_cached_tokens or 0)
            return self.chunk(index, self.tokenizer.decode(ids) if self.echo else "", "length")
        self.usage.add_event(index, ids, event)
        lps = (completion_logprobs(self.tokenizer, [(event.token_id, event.logprobs)])
               if self.logprobs is not None else None)
        return self.chunk(index, event.text, event.finish_reason if event.finished else None, lps)

    def chunk(self, index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse(dict(self.head, choices=[{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": finish}]))
