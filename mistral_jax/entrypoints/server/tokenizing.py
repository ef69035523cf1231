"""Tokenizer work kept off an HTTP process's event loop.

A request's text is encoded (and its chat template rendered) before the engine sees it. Small
bodies are encoded inline: microseconds, less than any hand-off. Large ones go to a worker
process holding its own copy of the tokenizer, so the event loop keeps streaming every other
client's tokens meanwhile. A process, not a thread: Hugging Face's `tokenizers.encode` holds the
GIL for the whole call (a 5.6 MB text: 6.3 s with no other thread running).

The worker answers with the ids as one int32 array (unpickled as a single copy, where a list of
two million ints held the loop for a tenth of a second), or, for /tokenize, the response body
ready to send."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

# Bodies up to this many bytes are tokenized inline: even the slowest tokenizer (the demo's
# byte-level BPE) then holds the event loop for milliseconds at most; larger ones go to the worker.
INLINE_BODY_BYTES = 8 << 10

_tokenizer = None  # the worker process's own


def _load(source: str, mode: str) -> None:
    global _tokenizer
    from mistral_jax.entrypoints.server import die_with_parent, name_process
    from mistral_jax.tokenizer import load_tokenizer

    name_process("mj-tokenizer")
    die_with_parent()

    _tokenizer = load_tokenizer(source, mode)


def _ready() -> bool:
    return _tokenizer is not None


def _encode(text: str, add_bos: bool) -> np.ndarray:
    return np.asarray(_tokenizer.encode(text, add_bos=add_bos), np.int32)


def _encode_chat(messages: list[dict], tools) -> np.ndarray:
    return np.asarray(_tokenizer.encode_chat(messages, tools=tools), np.int32)


def _tokenize_body(prompt: str | None, messages, add_bos: bool, max_model_len: int) -> bytes:
    ids = _tokenizer.encode(prompt, add_bos=add_bos) if prompt is not None else _tokenizer.encode_chat(messages, None)
    return json.dumps({"tokens": ids, "count": len(ids), "max_model_len": max_model_len}).encode()


class Tokenizing:
    """Encodes inline or in the worker process, by the request body's size (`big`)."""

    def __init__(self, tokenizer, source: str, mode: str = "auto"):
        self.tokenizer, self.source, self.mode = tokenizer, source, mode
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the worker now (loading its tokenizer takes a moment), not at the first big body."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_load, initargs=(self.source, self.mode))
            self._pool.submit(_ready)

    async def _run(self, fn, *args):
        self.start()
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def encode(self, text: str, add_bos: bool, big: bool):
        """Token ids: a list, or an int32 array when the worker made them."""
        if not big:
            return self.tokenizer.encode(text, add_bos=add_bos)
        return await self._run(_encode, text, add_bos)

    async def encode_chat(self, messages: list[dict], tools, big: bool):
        if not big:
            return self.tokenizer.encode_chat(messages, tools=tools)
        return await self._run(_encode_chat, messages, tools)

    async def tokenize_body(self, prompt: str | None, messages, add_bos: bool, max_model_len: int) -> bytes:
        return await self._run(_tokenize_body, prompt, messages, add_bos, max_model_len)

    def close(self) -> None:
        if self._pool is not None:
            for process in list((self._pool._processes or {}).values()):  # a long encode is not waited for
                process.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
