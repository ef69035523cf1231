"""The engine process's loop (server/engine_process.py) over real pipes and a real engine: a step
that raises fails the requests it ran, each told why, and the engine serves what comes next;
several failed steps in a row are a Fault that ends the loop."""

import multiprocessing
import threading
import time

import pytest

from mistral_jax import LLM, SamplingParams
from mistral_jax.entrypoints.server import channel
from mistral_jax.entrypoints.server.engine_process import MAX_FAILED_STEPS, Add, Batch, EngineLoop, Fault

PROMPT = [5, 17, 300, 4000, 22, 9]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, progress=False)


class Loop:
    """EngineLoop in a thread, one HTTP process's pipes in the test's hands."""

    def __init__(self, engine):
        inbox, self.to_engine = multiprocessing.Pipe(duplex=False)
        self.from_engine, outbox = multiprocessing.Pipe(duplex=False)
        self._ends = (inbox, outbox)
        self.loop = EngineLoop(engine, [inbox], [outbox])
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.loop.run()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def add(self, request_id, engine, max_tokens=8):
        params = engine.check_request(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                      "prompt")
        channel.send(self.to_engine.fileno(), [Add(request_id, PROMPT, params, time.perf_counter())])

    def until(self, done, seconds=60):
        """Messages from the engine until done(message) (or a Fault)."""
        seen, deadline = [], time.time() + seconds
        while time.time() < deadline:
            if not channel.poll(self.from_engine.fileno(), 0.5):
                continue
            message = channel.recv(self.from_engine.fileno())
            seen.append(message)
            if isinstance(message, Fault) or done(message):
                return seen
        raise TimeoutError(f"nothing ended in {seconds} s: {seen[-3:]}")

    def stop(self):
        channel.send(self.to_engine.fileno(), None)
        self.thread.join(30)


def text_of(messages, request_id):
    return "".join(e.text for m in messages if isinstance(m, Batch) for e in m.events if e.request_id == request_id)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch):
    want = llm.generate([{"prompt_token_ids": PROMPT}],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text
    engine = llm.engine
    free = engine.allocator.num_free_pages
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    loop = Loop(engine)
    try:
        loop.add("a", engine)
        seen = loop.until(lambda m: isinstance(m, Batch) and m.failed)
        (failed,) = [f for m in seen if isinstance(m, Batch) for f in m.failed]
        assert failed[0] == "a" and "injected failure" in failed[1] and "goes on" in failed[1]
        loop.add("b", engine)
        seen = loop.until(lambda m: isinstance(m, Batch) and any(e.finished for e in m.events))
        assert text_of(seen, "b") == want
        assert engine.allocator.num_free_pages == free  # 14 tokens: no full page for the prefix cache to keep
    finally:
        loop.stop()
    assert loop.error is None
    assert not engine.sequences
    while engine.has_unfinished_requests():  # the step the engine ran ahead, read
        engine.step()


def test_steps_failing_in_a_row_are_a_fault(llm, monkeypatch):
    engine = llm.engine

    def broken_step():
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(engine, "step", broken_step)
    loop = Loop(engine)
    failures = []
    for i in range(MAX_FAILED_STEPS):
        loop.add(f"r{i}", engine)
        seen = loop.until(lambda m: isinstance(m, (Batch, Fault)) and (isinstance(m, Fault) or m.failed))
        failures += [m for m in seen if isinstance(m, Fault) or m.failed]
    assert isinstance(failures[-1], Fault) and "the device is gone" in failures[-1].message
    assert all(isinstance(m, Batch) for m in failures[:-1]) and len(failures) == MAX_FAILED_STEPS
    loop.thread.join(30)
    assert isinstance(loop.error, RuntimeError)
    monkeypatch.undo()
    engine.abort_all()
