"""A request's generations as the engine streams them: submitted, then either collected whole
(a non-streamed response) or merged into one stream of (choice index, event).

Invariant: every stream is closed however the handler ends (finished, failed, cancelled, the
client gone); closing one that has not finished aborts its request, and the engine frees its
pages before its next step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server.bridge import EngineClient, RequestStream
from mistral_jax.entrypoints.server.errors import BadRequest, log

Streams = list[tuple[int, RequestStream]]  # (choice index, its stream)


class Result:
    """One choice's generation, collected."""

    def __init__(self):
        self.token_ids, self.logprobs, self.text = [], [], ""
        self.finish_reason, self.cached, self.prompt_logprobs = None, 0, None


def submit(bridge: EngineClient, jobs, request: Request) -> Streams:
    """Every job (index, ids, params) to the engine now, before the handler returns."""
    arrived = getattr(request.state, "arrived", None)
    return [(index, bridge.submit(ids, params, arrived)) for index, ids, params in jobs]


async def _collect(stream: RequestStream) -> Result:
    r = Result()
    async for event in stream:
        r.token_ids.append(event.token_id)
        r.logprobs.append(event.logprobs)
        r.text += event.text
        if event.prompt_logprobs is not None:
            r.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            r.finish_reason, r.cached = event.finish_reason, event.num_cached_tokens or 0
    return r


async def collect_unless_disconnected(request: Request, streams: Streams) -> list[Result]:
    """A non-streamed request's generations, collected; a client that hangs up before they end
    (a client-side timeout) has them aborted (the engine frees their pages), which the log says
    in one line: a routine event, not a fault."""
    tasks = [asyncio.ensure_future(_collect(s)) for _, s in streams]
    work = asyncio.gather(*tasks)
    try:
        while not work.done():
            await asyncio.wait([work], timeout=0.5)
            if not work.done() and await request.is_disconnected():
                log.info("request %s: the client disconnected before its response; aborting its %d generation(s) "
                         "(the engine frees their pages)", request.state.request_id, len(streams))
                raise BadRequest("the client disconnected", status=499)
        return work.result()
    finally:
        # Whatever ended the wait (the client gone, a choice failed, the handler cancelled), no
        # collector outlives it. A gather whose tasks were cancelled holds a CancelledError as
        # its exception; it is retrieved here, or asyncio would log it with a traceback.
        for task in tasks:
            task.cancel()
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        for _, stream in streams:
            stream.close()


async def merged(streams: Streams) -> AsyncIterator[tuple[int, StepEvent]]:
    """Events of several requests (index, event) in arrival order."""
    if len(streams) == 1:  # one request (n = 1): its own events, without a task and a second queue
        index, stream = streams[0]
        async for event in stream:
            yield index, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for event in stream:
                await queue.put((index, event))
        except BaseException as e:  # noqa: BLE001
            await queue.put((index, e))
            raise
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(*s)) for s in streams]
    try:
        done = 0
        while done < len(tasks):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
