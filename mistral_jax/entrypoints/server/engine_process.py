"""The engine's own process: it loads the model, steps the engine, and talks to each HTTP process
over a pair of pipes (vLLM's split of API server and engine core; --api-server-count HTTP
processes in front of one engine).

Why a process: in one process the engine's host work (launching a step, reading its tokens,
detokenizing) and the event loop's per-chunk work share one GIL: under many streams a step then
launches late and the GPU idles (docs/performance.md, "Serving over HTTP"). Here the engine
process does nothing but step; the HTTP process parses, checks, streams.

Messages (channel.py's framing: any size) in, one at a time or as a list: Add (a request, its
prompt checked by the HTTP process), Abort, None (stop). Out: Ready or Failed once at start,
then one Batch per loop turn to each HTTP process (its requests admitted, their events,
rejections and failures, and a snapshot of the engine's gauges), or Fault (the engine stopped).

A step that raises fails the requests it held (each hears why), and the engine goes on with
what arrives next; MAX_FAILED_STEPS in a row (a broken device, not a bad request) is a Fault,
and this process exits. The engine process exits when the first HTTP process (the one that started it) tells
it to stop or goes away (its pipe closes); another HTTP process that goes away has its requests
aborted."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.engine.request_limits import RequestLimits
from mistral_jax.entrypoints.server import channel
from mistral_jax.sample.sampling import SamplingParams

# Requests that arrive together after an idle spell start in one step: the HTTP process parses a
# burst one request at a time, and the first would otherwise start alone while the rest wait a
# whole (prefill) step. A lone request waits one gap; a burst waits until a step is full or the
# window ends. A shorter gap split bursts of 64 streams and lost throughput; a longer one delays
# a lone request's first token (docs/performance.md, "Serving over HTTP").
ARRIVAL_GAP_S = 0.002
ARRIVAL_WINDOW_S = 0.030
# MISTRAL_JAX_STEP_LOG=path: one JSON line per step (when its requests arrived and were taken, when
# the step ran), to see where a request's time before its first token went.
STEP_LOG_ENV = "MISTRAL_JAX_STEP_LOG"
# Steps failing one after another before the engine gives up (Fault): one failure is a request's
# (its requests fail, the rest go on); several in a row, with fresh requests each time, is the
# engine's or the device's.
MAX_FAILED_STEPS = 3


# ---- messages ------------------------------------------------------------------------------

@dataclasses.dataclass
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # checked (RequestLimits.check: seed and max_tokens filled)
    arrived: float  # time.perf_counter() when the HTTP request arrived (one clock for all processes)
    matcher: object = None  # set in the engine process: the request's grammar state
    front: int = 0  # set in the engine process: which HTTP process sent it


@dataclasses.dataclass
class Gone:
    front: int  # an HTTP process's pipe closed: abort its requests


@dataclasses.dataclass
class Abort:
    request_id: str


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the HTTP process needs to know of the engine (sent once, when it is ready)."""

    model_path: str
    tokenizer_source: str
    max_model_len: int
    limits: RequestLimits
    speculative: bool
    tokenizer_mode: str = "auto"  # load_tokenizer's mode (vLLM's tokenizer_mode)
    default_sampling: dict = dataclasses.field(default_factory=dict)  # generation_config: defaults of unset fields
    seed: int | None = 0  # the engine's seed: HTTP process k draws unseeded requests' seeds from rng([seed, k])


@dataclasses.dataclass(frozen=True)
class Stats:
    """The engine's gauges after a loop turn (/metrics)."""

    running: int = 0
    waiting: int = 0
    used_pages: int = 0
    free_pages: int = 0
    num_pages: int = 2
    prompt_tokens: int = 0  # prefix cache: prompt tokens looked up, and those found
    cached_tokens: int = 0
    spec: tuple[int, int, int] = (0, 0, 0)  # drafts, draft tokens, accepted tokens
    # compiled programs the engine holds: constant after warm-up (a rise: a request waited on a compile)
    programs: int = 0


@dataclasses.dataclass
class Ready:
    info: EngineInfo
    stats: Stats


@dataclasses.dataclass
class Failed:
    message: str  # the engine could not start (bad settings, a missing file): names the fix


@dataclasses.dataclass
class Batch:
    admitted: list[tuple[str, int, float, float]]  # (request_id, prompt tokens, arrival, admission: perf_counter)
    events: list[StepEvent]
    rejected: list[tuple[str, str]]  # (request_id, why): not taken (its input)
    stats: Stats
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (request_id, why): a step failed


@dataclasses.dataclass
class Fault:
    message: str


# ---- the process ---------------------------------------------------------------------------

def main(inboxes: list, outboxes: list, engine_args) -> None:
    """The engine process's entry (multiprocessing, spawned): build the engine (engine/build.py,
    as LLM does: the same start-up report), report, step until told to stop. inboxes[k],
    outboxes[k]: the pipes of HTTP process k; engine_args: the EngineArgs the HTTP process checked."""
    # The HTTP processes own signals: they drain the running requests on SIGTERM / Ctrl-C and then
    # the first stops this process through its pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from mistral_jax.entrypoints.server import name_process

    name_process("mj-engine")
    from mistral_jax.engine.build import build
    from mistral_jax.runtime import distributed

    try:
        built = build(engine_args)  # joins the other processes of a multi-host run first
    except (ValueError, FileNotFoundError, TypeError, distributed.DistributedInitError) as e:
        _tell_all(outboxes, Failed(str(e)))
        return
    except BaseException as e:  # a fault of ours: the HTTP process reports it, then this traceback follows
        _tell_all(outboxes, Failed(f"{type(e).__name__}: {e}"))
        raise
    # The model, its programs and JAX's state live as long as this process: out of the cyclic GC's
    # full passes, which would otherwise walk all of it and stall the loop between two steps.
    gc.freeze()
    engine = built.engine
    info = EngineInfo(built.model_path, built.tokenizer_source, built.max_model_len, engine.limits,
                      engine.speculator is not None, engine_args.tokenizer_mode, dict(built.default_sampling),
                      engine.config.seed)
    _tell_all(outboxes, Ready(info, stats_of(engine)))
    EngineLoop(engine, inboxes, outboxes).run()


def _tell_all(outboxes, message) -> None:
    for outbox in outboxes:
        with contextlib.suppress(BrokenPipeError, EOFError, OSError):
            channel.send(outbox.fileno(), message)


def stats_of(engine) -> Stats:
    a, s = engine.allocator, engine.speculator
    spec = (s.stats.num_drafts, s.stats.num_draft_tokens, s.stats.num_accepted_tokens) if s is not None else (0, 0, 0)
    return Stats(len(engine.scheduler.running), len(engine.scheduler.waiting), a.num_used_pages, a.num_free_pages,
                 a.num_pages, a.stats.prompt_tokens, a.stats.cached_tokens, spec, _programs_held(engine))


def _programs_held(engine) -> int:
    return engine.programs_held()


class EngineLoop:
    """Steps the engine while it has work; between steps it takes what arrived (new requests
    join the running batch at the next step, aborted ones free their pages before it)."""

    def __init__(self, engine, inboxes: list, outboxes: list):
        self.engine, self.inboxes, self.outboxes = engine, inboxes, list(outboxes)
        self._arrivals: queue.SimpleQueue = queue.SimpleQueue()  # Add / Abort / Gone / None, in order
        self._owner: dict[str, int] = {}  # running request -> the HTTP process that sent it
        self._admitted: list = []
        self._arrived_tokens = 0  # prompt tokens taken since the engine was last idle
        self._rejected: list = []
        self._failed: list = []  # (front, request_id, why)
        self._failed_steps = 0  # in a row
        self._stopping = False
        # Grammars compile off the loop (a complex one takes up to a second); a request aborted
        # while its grammar compiles is dropped when it is done.
        self._grammars = ThreadPoolExecutor(2, thread_name_prefix="mistral-jax-grammar")
        self._compiling: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._receive, name="mistral-jax-receive", daemon=True).start()

    # ---- the receiving thread -------------------------------------------------------------

    def _receive(self) -> None:
        live = {inbox: front for front, inbox in enumerate(self.inboxes)}
        while True:
            for inbox in wait(list(live)):
                front = live[inbox]
                try:
                    received = channel.recv(inbox.fileno())
                except (EOFError, OSError):  # that HTTP process is gone
                    received = None if front == 0 else [Gone(front)]
                    del live[inbox]
                if received is None:  # the first HTTP process stops the engine (or went away)
                    return self._arrivals.put(None)
                for message in received if isinstance(received, list) else [received]:
                    if message is None:
                        return self._arrivals.put(None)
                    if isinstance(message, Add):
                        message.front = front
                    self._route(message)

    def _route(self, message) -> None:
        if isinstance(message, Add) and message.params.structured_outputs is not None:
            with self._lock:
                self._compiling.add(message.request_id)
            self._grammars.submit(self._compile, message)
            return
        if isinstance(message, Abort):
            with self._lock:
                if message.request_id in self._compiling:
                    self._cancelled.add(message.request_id)
                    return
        self._arrivals.put(message)

    def _compile(self, add: Add) -> None:
        try:
            add.matcher = self.engine.matcher(add.params)
        except Exception as e:  # noqa: BLE001  (the HTTP process checked it; reported if not)
            add.matcher = e
        with self._lock:
            self._compiling.discard(add.request_id)
            if add.request_id in self._cancelled:
                self._cancelled.discard(add.request_id)
                return
        self._arrivals.put(add)

    # ---- the engine's thread ----------------------------------------------------------------

    def _take(self, message) -> None:
        if message is None:
            self._stopping = True
        elif isinstance(message, Add):
            if self.outboxes[message.front] is None:
                return  # its HTTP process is gone
            try:
                if isinstance(message.matcher, Exception):
                    raise message.matcher
                self.engine.add_request(message.prompt_ids, message.params, request_id=message.request_id,
                                        matcher=message.matcher)
                self._owner[message.request_id] = message.front
                self._admitted.append((message.request_id, len(message.prompt_ids), message.arrived,
                                       time.perf_counter()))
                self._arrived_tokens += len(message.prompt_ids)
            except Exception as e:  # noqa: BLE001  the HTTP process raises it in the request's handler
                self._rejected.append((message.front, message.request_id, f"{type(e).__name__}: {e}"))
        elif isinstance(message, Abort):
            if self._owner.pop(message.request_id, None) is not None:
                self.engine.abort_request(message.request_id)
        elif isinstance(message, Gone):
            self.outboxes[message.front] = None
            for request_id in [r for r, front in self._owner.items() if front == message.front]:
                del self._owner[request_id]
                self.engine.abort_request(request_id)

    def _take_waiting(self, block: bool) -> None:
        """Everything that has arrived. After an idle spell (block), wait for the first and then
        take what comes within ARRIVAL_GAP_S of the last, for at most ARRIVAL_WINDOW_S or until
        the prompts taken fill a step (more could not start in it)."""
        if block:
            self._arrived_tokens = 0
            self._take(self._arrivals.get())
            deadline = time.monotonic() + ARRIVAL_WINDOW_S
            full = self.engine.config.max_num_batched_tokens
            while ((left := deadline - time.monotonic()) > 0 and not self._stopping
                   and self._arrived_tokens < full):
                try:
                    self._take(self._arrivals.get(timeout=min(ARRIVAL_GAP_S, left)))
                except queue.Empty:
                    break
        while not self._stopping:
            try:
                self._take(self._arrivals.get_nowait())
            except queue.Empty:
                break

    def run(self) -> None:
        log = open(path, "a", buffering=1) if (path := os.environ.get(STEP_LOG_ENV)) else None
        try:
            while not self._stopping:
                idle = not self.engine.has_unfinished_requests()
                self._take_waiting(block=idle)
                if self._stopping:
                    break
                t0 = time.perf_counter()
                events = self._step()
                if log is not None:  # _admitted: this turn's requests (arrived, taken), until sent
                    log.write(json.dumps({"idle": idle, "took": [(a[2], a[3]) for a in self._admitted],
                                          "step": [t0, time.perf_counter()],
                                          "running": len(self.engine.scheduler.running)}) + "\n")
                self._send_batches(events)
        except BaseException as e:  # noqa: BLE001  every waiting request hears of it
            for front in range(len(self.outboxes)):
                self._send(front, Fault(f"{type(e).__name__}: {e}"))
            raise
        finally:
            self._grammars.shutdown(wait=False, cancel_futures=True)
            if log is not None:
                log.close()

    def _step(self) -> list[StepEvent]:
        """One engine step. If it raises, its requests fail (each hears why) and the engine is
        emptied to a consistent state (Engine.abort_all) to serve what comes next."""
        if not self.engine.has_unfinished_requests():
            return []
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001
            self._failed_steps += 1
            print(f"[engine] a step failed ({self._failed_steps} in a row):", file=sys.stderr)
            traceback.print_exc()
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise
            why = (f"the engine failed while running this request ({type(e).__name__}: {e}); "
                   "the server goes on: retry, and report this as a bug if it repeats")
            for request_id in self.engine.abort_all():
                if (front := self._owner.pop(request_id, None)) is not None:
                    self._failed.append((front, request_id, why))
            return []
        self._failed_steps = 0
        return events

    def _send_batches(self, events: list[StepEvent]) -> None:
        """One Batch to each HTTP process: its own requests' news, and the engine's gauges."""
        stats = stats_of(self.engine)
        batches = [Batch([], [], [], stats) for _ in self.outboxes]
        for admitted in self._admitted:
            if (front := self._owner.get(admitted[0])) is not None:
                batches[front].admitted.append(admitted)
        for front, request_id, why in self._rejected:
            batches[front].rejected.append((request_id, why))
        for front, request_id, why in self._failed:
            batches[front].failed.append((request_id, why))
        for event in events:
            front = (self._owner.pop if event.finished else self._owner.get)(event.request_id, None)
            if front is not None:
                batches[front].events.append(event)
        self._admitted, self._rejected, self._failed = [], [], []
        for front, batch in enumerate(batches):
            self._send(front, batch)

    def _send(self, front: int, message) -> None:
        if (outbox := self.outboxes[front]) is None:
            return
        try:
            channel.send(outbox.fileno(), message)
        except (BrokenPipeError, EOFError, OSError):  # that HTTP process is gone
            if front == 0:
                self._stopping = True  # the one that started the engine: nothing left to serve
            else:
                self._arrivals.put(Gone(front))
