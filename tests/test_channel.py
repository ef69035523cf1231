"""channel.py: messages of any size between the engine process and an HTTP process's event loop,
under asyncio's and uvloop's loops; a read that would block is never taken for the writer's end."""

import asyncio
import os
import threading

import numpy as np
import pytest

from mistral_jax.entrypoints.server import channel

SIZES = [1, 64 << 10, (64 << 10) + 1, 1 << 20, 16 << 20]


def loops():
    yield "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return
    yield "uvloop", uvloop.new_event_loop


LOOPS = dict(loops())


def payload(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_reader_takes_messages_of_any_size(loop_kind):
    """A blocking writer (the engine process's side) sends 1 B to 16 MB messages in a burst; the
    event loop's reader gets each one whole, in order, then end-of-file once the writer closes."""
    r, w = os.pipe()
    sent = [(i, payload(size, i)) for i, size in enumerate(SIZES * 2)]

    def write():
        for message in sent:
            channel.send(w, message)
        os.close(w)

    loop = LOOPS[loop_kind]()
    got, closed = [], loop.create_future()
    reader = channel.AsyncReader(r)
    reader.attach(loop, got.append, lambda why: closed.set_result(why))
    writer = threading.Thread(target=write)
    writer.start()
    try:
        why = loop.run_until_complete(asyncio.wait_for(closed, 60))
    finally:
        writer.join()
        loop.close()
        os.close(r)
    assert why == "end of file"
    assert [m[0] for m in got] == [m[0] for m in sent]
    assert all(a[1] == b[1] for a, b in zip(got, sent))


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_writer_never_blocks_the_loop(loop_kind):
    """The loop's writer queues what a slow reader has not taken (16 MB against a 64 KiB pipe)
    and goes on ticking; the reader then gets every message whole."""
    r, w = os.pipe()
    messages = [payload(size, 100 + i) for i, size in enumerate(SIZES)]
    loop = LOOPS[loop_kind]()
    writer = channel.AsyncWriter(w)
    writer.attach(loop)
    ticks = []

    async def main():
        for m in messages:
            writer.write(m)  # returns at once: the pipe holds only 64 KiB
        assert writer.buffered > 0
        received = []
        reading = threading.Thread(target=lambda: received.extend(channel.recv(r) for _ in messages))
        reading.start()
        while reading.is_alive():
            ticks.append(loop.time())
            await asyncio.sleep(0.001)
        reading.join()
        return received

    try:
        received = loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
        os.close(r)
        os.close(w)
    assert received == messages
    assert writer.buffered == 0
    assert len(ticks) > 1


def test_a_half_written_message_waits():
    """Bytes of a message still on their way (the pipe gave EAGAIN mid-message) are no message
    and no end: the reader hands nothing on until the rest arrives."""
    r, w = os.pipe()
    frame = channel._frame(("x", payload(200_000, 1)))
    loop = asyncio.new_event_loop()
    got, closed = [], []
    reader = channel.AsyncReader(r)
    reader.attach(loop, got.append, closed.append)

    async def main():
        os.write(w, frame[:5000])
        await asyncio.sleep(0.05)
        assert got == [] and closed == []
        rest = memoryview(frame)[5000:]

        def finish():
            view = rest
            while view:
                view = view[os.write(w, view):]

        await loop.run_in_executor(None, finish)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        os.close(r)
        os.close(w)
    assert len(got) == 1 and got[0][0] == "x" and closed == []
