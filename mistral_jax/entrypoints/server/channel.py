"""Messages between the engine process and the HTTP processes, over one-way OS pipes.

A message is pickled and framed by its length (8 bytes, little-endian), so a reader takes any
size (a step's batch with top-20 logprobs for 150 streams, an echo of a long prompt) in as many
reads as the pipe needs. Two sides:

- `send` / `recv`: blocking, whole messages (the engine process's threads, and start-up).
- `AsyncReader` / `AsyncWriter`: an HTTP process's event loop. The pipe is set non-blocking and
  read into a buffer as bytes come; a message is handed on only once all of it is there. A read
  that would block is just "not yet": only end-of-file (every writer closed: the engine exited)
  or a read error is the other side's death. Writes that do not fit the pipe wait in a buffer
  for the loop's next writable turn, so the loop never blocks on a busy or wedged engine.

(multiprocessing's Connection.recv assumes a blocking descriptor: once an event loop made it
non-blocking, a message over the pipe's 64 KiB failed halfway with BlockingIOError.)"""

from __future__ import annotations

import errno
import os
import pickle
import select
import struct

HEADER = struct.Struct("<Q")
READ_CHUNK = 1 << 20


class ChannelClosed(EOFError):
    """The other end of the pipe is closed (its process exited)."""


def _frame(message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def send(fd: int, message) -> None:
    """Write one whole message to a blocking pipe (BrokenPipeError if its reader is gone)."""
    view = memoryview(_frame(message))
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int, timeout: float | None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"no message on the pipe within {timeout} s")
        try:
            chunk = os.read(fd, min(n - len(out), READ_CHUNK))
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        if not chunk:
            raise ChannelClosed("the pipe's writer closed it")
        out += chunk
    return bytes(out)


def recv(fd: int, timeout: float | None = None):
    """Read one whole message (ChannelClosed at end-of-file). timeout bounds each wait for bytes."""
    (size,) = HEADER.unpack(_read_exactly(fd, HEADER.size, timeout))
    return pickle.loads(_read_exactly(fd, size, timeout))


def poll(fd: int, timeout: float) -> bool:
    """Whether bytes (or end-of-file) are waiting on fd within timeout seconds."""
    return bool(select.select([fd], [], [], timeout)[0])


class AsyncReader:
    """Reads messages from a pipe inside an event loop: on_message(message) for each whole one,
    in order; on_closed(why) once, at end-of-file or a read error."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = bytearray()
        self._loop = None
        self._on_message = self._on_closed = None

    def attach(self, loop, on_message, on_closed) -> None:
        os.set_blocking(self.fd, False)
        self._loop, self._on_message, self._on_closed = loop, on_message, on_closed
        loop.add_reader(self.fd, self._readable)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def _readable(self) -> None:
        closed = None
        while True:  # drain what the pipe holds now
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                closed = f"reading the engine's pipe failed: {e}"
                break
            if not chunk:
                closed = "end of file"
                break
            self._buffer += chunk
        self._deliver()
        if closed is not None and self._loop is not None:
            self.detach()
            self._on_closed(closed)

    def _deliver(self) -> None:
        buffer, at = self._buffer, 0
        while len(buffer) - at >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, at)
            end = at + HEADER.size + size
            if len(buffer) < end:
                break
            message = pickle.loads(buffer[at + HEADER.size:end])  # a copy: the buffer is resized below
            at = end
            self._on_message(message)
            if self._loop is None:  # the handler detached us (the engine said it stopped)
                break
        del buffer[:at]


class AsyncWriter:
    """Writes messages to a pipe from an event loop without ever blocking it: what the pipe does
    not take now waits in a buffer, in order, and goes out when the pipe has room."""

    def __init__(self, fd: int):
        self.fd = fd
        self._pending = bytearray()
        self._loop = None
        self.broken = False  # the reader is gone: later messages are dropped (the reader side reports it)

    def attach(self, loop) -> None:
        os.set_blocking(self.fd, False)
        self._loop = loop

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def write(self, message) -> None:
        if self.broken:
            return
        if self._loop is None:  # before the loop runs (start-up): a plain blocking write
            try:
                send(self.fd, message)
            except (BrokenPipeError, OSError):
                self.broken = True
            return
        waiting = bool(self._pending)
        self._pending += _frame(message)
        if not waiting:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._pending:
                n = os.write(self.fd, self._pending)
                del self._pending[:n]
        except (BlockingIOError, InterruptedError):
            self._loop.add_writer(self.fd, self._writable)
            return
        except OSError as e:
            self.broken = True
            self._pending.clear()
            if e.errno not in (errno.EPIPE, errno.EBADF):
                raise
        self._loop.remove_writer(self.fd)

    def _writable(self) -> None:
        self._flush()

    def try_write_now(self, message) -> bool:
        """One message, written only if the pipe takes all of what is buffered and it at once
        (shutdown's stop message: never waits on an engine that stopped reading)."""
        if self.broken:
            return False
        data = self._pending + _frame(message)
        was_blocking = os.get_blocking(self.fd)
        os.set_blocking(self.fd, False)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self._pending.clear()
            return True
        except OSError:
            return False
        finally:
            os.set_blocking(self.fd, was_blocking)
