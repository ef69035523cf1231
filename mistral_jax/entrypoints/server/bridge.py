"""The async bridge: the HTTP process's side of the engine process (engine_process.py).

It starts the engine process and waits until the model is loaded and warm; checks each request
as the engine would (RequestLimits) so bad input is a 400 before any work; sends requests and
aborts down one pipe; and reads the engine's batches from the other inside the event loop
(channel.py: framed messages of any size, read as bytes come; no thread), handing each
request's events to its handler. Requests that arrive while a batch runs join it at the next
step (continuous batching across clients). A handler that stops reading (a client disconnects,
a task is cancelled) aborts its request: the engine frees its pages before its next step.

Supervision: the first HTTP process holds the engine process. If the engine dies (its pipe
closes, its process ends, or it reports a fault), every waiting request hears EngineStopped,
`fault` says why, and on_stop runs once (the server then exits non-zero: a supervisor restarts
it). A read that would block is never taken for the engine's death."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import time
from collections.abc import AsyncIterator

import numpy as np

from mistral_jax.engine.args import EngineArgs
from mistral_jax.engine.outputs import StepEvent
from mistral_jax.entrypoints.server import channel, engine_process
from mistral_jax.entrypoints.server.engine_process import Abort, Add, Batch, Failed, Fault, Ready, Stats
from mistral_jax.sample.sampling import SamplingParams


class EngineStopped(RuntimeError):
    """The engine has stopped (shutdown, or a fault it reported)."""


class RequestFailed(RuntimeError):
    """The engine did not run one request to its end. status 400: it refused the request's input;
    500: a step that ran it failed (the engine went on with its other requests)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EngineStartError(RuntimeError):
    """The engine process could not load the model (the message names the fix)."""


def start_engine(engine_args: EngineArgs, fronts: int = 1):
    """Spawn the engine process (it builds the engine engine_args describe, engine/build.py, and
    warms it up) with a pair of pipes for each of `fronts` HTTP processes. Returns the process and
    the pairs (to_engine, from_engine); pair 0 belongs to the first HTTP process, which stops the
    engine when it is done."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX state inherited
    pairs, inboxes, outboxes = [], [], []
    for _ in range(fronts):
        inbox, to_engine = ctx.Pipe(duplex=False)
        from_engine, outbox = ctx.Pipe(duplex=False)
        pairs.append((to_engine, from_engine))
        inboxes.append(inbox)
        outboxes.append(outbox)
    process = ctx.Process(target=engine_process.main, name="mistral-jax-engine", daemon=True,
                          args=(inboxes, outboxes, engine_args))
    process.start()
    for end in inboxes + outboxes:  # the engine process's ends: closed here, so its exit reads as EOF
        end.close()
    return process, pairs


class EngineClient:
    def __init__(self, pipes, process=None, front: int = 0, observers=()):
        """One HTTP process's side of the engine process; waits until it serves (weights loaded,
        programs warm). pipes: (to_engine, from_engine) from start_engine. process: the engine
        process, held by the first HTTP process (front 0), which stops it on shutdown after the
        others (companions) have exited. observers: objects with added(request_id, prompt_len,
        arrived, admitted), event(StepEvent) and aborted(request_id), called in the event loop
        (metrics)."""
        self._pipes = pipes  # the Connection objects own the descriptors (closed with them)
        self._to_engine, self._from_engine = (channel.AsyncWriter(pipes[0].fileno()),
                                              channel.AsyncReader(pipes[1].fileno()))
        self.process, self.front = process, front
        self.companions: list = []  # the other HTTP processes (front 0 only)
        self.on_stop = None  # called once if the engine goes away
        self.observers = list(observers)
        self.fault: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outgoing: list = []
        ready = self._wait_ready()
        self.info: engine_process.EngineInfo = ready.info
        self.stats: Stats = ready.stats
        if self.info.seed is not None:  # a server's run repeats itself too (vLLM's --seed), per HTTP process
            self._rng = np.random.default_rng([self.info.seed, front])

    def _wait_ready(self) -> Ready:
        exited = "the engine process exited{} before it was ready: its output above says why"
        fd = self._from_engine.fd
        while self.process is not None and not channel.poll(fd, 0.5):
            if not self.process.is_alive():
                raise EngineStartError(exited.format(f" (code {self.process.exitcode})"))
        try:
            message = channel.recv(fd)
        except EOFError:
            if self.process is not None:
                self.process.join(5)
            raise EngineStartError(exited.format(f" (code {self.process.exitcode})" if self.process else "")) \
                from None
        if isinstance(message, Failed):
            if self.process is not None:
                self.process.join(30)
            raise EngineStartError(message.message)
        return message

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's batches in this event loop (the server's, once it runs)."""
        self._loop = loop
        self._to_engine.attach(loop)
        self._from_engine.attach(loop, self._take, self._pipe_closed)
        if self.process is not None:  # its end, whatever happened to the pipes
            loop.add_reader(self.process.sentinel, self._process_ended)

    # ---- requests ---------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams, where: str = "the prompt") -> SamplingParams:
        """The engine's request check (context, cache, vocabulary): raises ValueError with the fix."""
        return self.info.limits.check(prompt_ids, params, where, self._rng)

    def submit(self, prompt_ids: list[int], params: SamplingParams, arrived: float | None = None) -> RequestStream:
        """Send a checked request to the engine now (a handler submits before it returns its
        response: under a burst, requests reach the engine as each is parsed, not after every
        other request's handler has run). Iterate the stream for its events; close() aborts it."""
        if self.fault is not None or self._stopping:
            raise EngineStopped(f"the engine is not running ({self.fault or 'shutting down'})")
        stream = RequestStream(self, f"r{self.front}-{next(self._ids)}")
        self._queues[stream.request_id] = stream.events
        arrived = time.perf_counter() if arrived is None else arrived
        self._send(Add(stream.request_id, prompt_ids, params, arrived))
        return stream

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepEvent]:
        """Events of one checked request, as the engine makes them; abandoning the iterator aborts it."""
        stream = self.submit(prompt_ids, params)
        try:
            async for event in stream:
                yield event
        finally:
            stream.close()

    def release(self, stream: RequestStream, abort: bool) -> None:
        """A stream is done with: forget it; abort its request if it has not finished."""
        self._queues.pop(stream.request_id, None)
        if abort:
            self._send(Abort(stream.request_id))
            for o in self.observers:
                o.aborted(stream.request_id)

    def _send(self, message) -> None:
        """Messages sent in one turn of the event loop go down the pipe together, as a list: under a
        burst, one write and one wake-up of the engine process's receiver instead of one each."""
        if self._loop is None or self._stopping:
            self._write(message)
            return
        self._outgoing.append(message)
        if len(self._outgoing) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        messages, self._outgoing = self._outgoing, []
        self._write(messages)

    def _write(self, message) -> None:
        self._to_engine.write(message)  # a dead engine shows as end-of-file on the read side

    # ---- the engine's batches (event loop) -------------------------------------------------

    def _exit_note(self) -> str:
        code = self.process.exitcode if self.process is not None else None
        if code is None:
            return ""
        return f" (killed by signal {-code})" if code < 0 else f" (exit code {code})"

    def _pipe_closed(self, why: str) -> None:
        if self._stopping:
            self._stop_all("shutting down")
            return
        if self.process is not None:
            self.process.join(1)  # its exit code, if it is ending
        self._stop_all(f"the engine process exited{self._exit_note()}" if why == "end of file" else why)

    def _process_ended(self) -> None:
        self._loop.remove_reader(self.process.sentinel)
        if not self._stopping:
            self.process.join(1)
            self._stop_all(f"the engine process exited{self._exit_note()}")

    def _take(self, message) -> None:
        if isinstance(message, Fault):
            self._stop_all(f"the engine stopped: {message.message}")
            return
        assert isinstance(message, Batch), message
        self.stats = message.stats
        for request_id, prompt_len, arrived, t in message.admitted:
            for o in self.observers:
                o.added(request_id, prompt_len, arrived, t)
        for request_id, why in message.rejected:
            if (q := self._queues.get(request_id)) is not None:
                q.put_nowait(RequestFailed(f"the engine did not take the request: {why}", 400))
        for request_id, why in message.failed:
            if (q := self._queues.get(request_id)) is not None:
                q.put_nowait(RequestFailed(why, 500))
        for event in message.events:
            for o in self.observers:
                o.event(event)
            if (q := self._queues.get(event.request_id)) is not None:
                q.put_nowait(event)

    def _stop_all(self, why: str) -> None:
        if self.fault is None and not self._stopping:
            self.fault = why
            if self.on_stop is not None:
                self.on_stop(why)
        self._from_engine.detach()
        if self.process is not None and self._loop is not None:
            self._loop.remove_reader(self.process.sentinel)
        for q in self._queues.values():
            q.put_nowait(EngineStopped(why))

    def shutdown(self, timeout: float = 5.0) -> None:
        """After the server has drained its requests (or its graceful time ran out): the first
        HTTP process waits for the others and stops the engine process; another one closes its
        pipes. Bounded: whatever has not ended within `timeout` seconds is killed (the engine
        ignores SIGTERM, which is the HTTP processes' to drain on), so SIGTERM always ends."""
        if self._stopping:
            return
        self._stopping = True
        if self.process is None:
            self._pipes[0].close()
            return
        deadline = time.monotonic() + timeout
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        for companion in self.companions:  # they drained in parallel (SIGTERM reached them all at once)
            companion.join(left())
            if companion.is_alive():  # hung: not left behind (a live child would also block our exit)
                companion.kill()
                companion.join(1)
        if not self._to_engine.try_write_now(None):  # an engine that stopped reading gets no stop message
            self.process.kill()
        self.process.join(left())
        if self.process.is_alive():  # wedged: SIGKILL, which nothing can ignore
            self.process.kill()
            self.process.join(2)



class RequestStream:
    """One submitted request's events, in order (an async iterator). close() aborts a request
    that has not finished (its pages are freed before the engine's next step); a stream
    dropped unclosed is closed when collected."""

    def __init__(self, client: EngineClient, request_id: str):
        self.client, self.request_id = client, request_id
        self.events: asyncio.Queue = asyncio.Queue()
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepEvent:
        if self.done:
            raise StopAsyncIteration
        event = await self.events.get()
        if isinstance(event, BaseException):  # the engine does not hold it (rejected, or stopped)
            self._finish(abort=False)
            raise event
        if event.finished:
            self._finish(abort=False)
        return event

    def close(self) -> None:
        self._finish(abort=True)

    def _finish(self, abort: bool) -> None:
        if not self.done:
            self.done = True
            self.client.release(self, abort)

    def __del__(self):
        if not self.done:
            self.close()
