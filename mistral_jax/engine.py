"""Batched generation: one jitted step for prefill and decode, bucketed shapes, host-side stops.

A batch of requests is prefilled together (prompts right-padded, padding at position -1), then
decoded one token per step. Shapes are rounded up to a small set of buckets (batch, prompt
length, cache length), so a steady workload never recompiles. The host reads step i's tokens
while the device already runs step i+1 (the next input tokens never leave the device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .kv_cache import DenseKVCache
from .model import Transformer
from .sampling import SamplingArrays, SamplingParams, init_penalty_state, sample, update_penalty_state
from .sharding import use_mesh
from .tokenizer import StreamDecoder, Tokenizer

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Round n up to a power of two (at least `minimum`), capped at `maximum`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum) if maximum is not None else b


@dataclasses.dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int  # position in the caller's list


@dataclasses.dataclass
class StepEvent:
    """What one request produced in one step (streamed to the caller)."""

    index: int
    token_id: int | None
    text: str  # new text, possibly "" (held back until it is valid UTF-8 / not a stop prefix)
    logprobs: dict[int, float] | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first event only


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "num_logprobs", "num_prompt_logprobs"),
    donate_argnames=("cache", "counts", "seen"),
)
def _step(graphdef, state, tokens, positions, logits_at, cache, sampling, step, counts, seen,
          num_logprobs: int, num_prompt_logprobs: int):
    """Run the model on tokens [batch, t] and sample one token per row from position logits_at."""
    model: Transformer = nnx.merge(graphdef, state)
    if num_prompt_logprobs:
        logits, cache = model(tokens, positions, cache)  # [batch, t, vocab]: every position
        last = jnp.take_along_axis(logits, logits_at[:, None, None], axis=1)[:, 0]
        prompt_lp = _prompt_logprobs(logits, tokens, num_prompt_logprobs)
    else:
        logits, cache = model(tokens, positions, cache, logits_at=logits_at[:, None])
        last, prompt_lp = logits[:, 0], None
    result = sample(last, sampling, step, counts, seen, num_logprobs)
    counts, seen = update_penalty_state(counts, seen, result.tokens)
    return result, prompt_lp, cache, counts, seen


def _prompt_logprobs(logits, tokens, n: int):
    """log p(prompt token t+1 | prefix up to t), and the top-n at each position."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, t-1, vocab]
    actual = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, n)
    return actual, top_ids, top_lp


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, mesh: Mesh, max_model_len: int,
                 max_num_seqs: int = 32):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.dtype = model.dtype
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    # ---- validation -----------------------------------------------------------------------

    def check_request(self, ids: list[int], params: SamplingParams, index: int) -> SamplingParams:
        """Reject bad input before any work starts; fill max_tokens=None up to the context."""
        where = f"prompt {index}"
        if len(ids) == 0:
            raise ValueError(f"{where} is empty: give at least one token (the tokenizer adds BOS to text prompts)")
        bad = [t for t in ids if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{where} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"{where} has {len(ids)} tokens, past the model's context of {self.max_model_len}: "
                f"shorten it to at most {self.max_model_len - 1} tokens"
            )
        if params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=room)
        if params.max_tokens > room:
            raise ValueError(
                f"{where} has {len(ids)} tokens and asks for max_tokens={params.max_tokens}: "
                f"{len(ids)} + {params.max_tokens} > context {self.max_model_len}. "
                f"Lower max_tokens to {room} or shorten the prompt"
            )
        return params

    # ---- generation -----------------------------------------------------------------------

    def stream(self, requests: list[Request]) -> Iterator[StepEvent]:
        checked = [dataclasses.replace(r, params=self.check_request(r.prompt_token_ids, r.params, r.index))
                   for r in requests]
        for start in range(0, len(checked), self.max_num_seqs):
            yield from self._stream_batch(checked[start : start + self.max_num_seqs])

    def _stream_batch(self, reqs: list[Request]) -> Iterator[StepEvent]:
        n = len(reqs)
        batch = bucket(n, 1)
        lens = np.array([len(r.prompt_token_ids) for r in reqs] + [1] * (batch - n), np.int32)
        t = bucket(int(lens.max()), MIN_PROMPT_BUCKET, self.max_model_len)
        cache_len = bucket(max(len(r.prompt_token_ids) + r.params.max_tokens for r in reqs),
                           MIN_CACHE_BUCKET, self.max_model_len)
        tokens = np.zeros((batch, t), np.int32)
        positions = np.full((batch, t), -1, np.int32)
        for i, r in enumerate(reqs):
            tokens[i, : lens[i]] = r.prompt_token_ids
            positions[i, : lens[i]] = np.arange(lens[i])
        positions[n:, 0] = 0  # padding rows: one dummy token so their softmax is well defined

        params = [r.params for r in reqs]
        num_logprobs = max((p.logprobs or 0) for p in params)
        num_prompt_logprobs = max((p.prompt_logprobs or 0) for p in params)
        # Each distinct value compiles once; round up so that few variants exist.
        num_logprobs = bucket(num_logprobs, 1) if num_logprobs else 0
        num_prompt_logprobs = bucket(num_prompt_logprobs, 1) if num_prompt_logprobs else 0

        self._check_cache_fits(n, batch, cache_len)
        with use_mesh(self.mesh):
            cache = self._new_cache(batch, cache_len)
            sampling = SamplingArrays.from_params(params, pad_to=batch)
            counts, seen = init_penalty_state(jnp.asarray(tokens), jnp.asarray(lens), self.cfg.vocab_size)
            step = jnp.zeros((batch,), jnp.int32)
            run = functools.partial(_step, self.graphdef, self.state, num_logprobs=num_logprobs)
            result, prompt_lp, cache, counts, seen = run(
                jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(lens - 1), cache, sampling,
                step, counts, seen, num_prompt_logprobs=num_prompt_logprobs)

            rows = [_RowState(r, self.tokenizer) for r in reqs]
            if num_prompt_logprobs:
                for row, plp in zip(rows, _split_prompt_logprobs(prompt_lp, reqs)):
                    row.prompt_logprobs = plp
            max_steps = max(r.params.max_tokens for r in reqs)
            pos = jnp.asarray(lens)
            first_column = jnp.zeros((batch,), jnp.int32)  # decode steps sample from their only token
            for i in range(max_steps):
                pending = result
                if i + 1 < max_steps:  # dispatch the next step before reading this one
                    step = step + 1
                    result, _, cache, counts, seen = run(
                        pending.tokens[:, None], pos[:, None], first_column, cache,
                        sampling, step, counts, seen, num_prompt_logprobs=0)
                    pos = pos + 1
                host = jax.device_get(pending)
                for b, row in enumerate(rows):
                    if not row.finished:
                        yield row.add(int(host.tokens[b]), _row_logprobs(host, b, row.params.logprobs))
                if all(row.finished for row in rows):
                    return

    def device_memory(self) -> dict | None:
        """The first device's allocator statistics (bytes_limit, bytes_in_use); None on CPU."""
        stats = self.mesh.devices.flat[0].memory_stats()
        return stats if stats and "bytes_limit" in stats else None

    def _check_cache_fits(self, n: int, batch: int, cache_len: int) -> None:
        """Say so before allocating a KV cache the device cannot hold (instead of an XLA OOM)."""
        stats = self.device_memory()
        if stats is None:
            return
        per_token = 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * jnp.dtype(self.dtype).itemsize
        need = per_token * batch * cache_len
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if need > 0.9 * free:
            raise ValueError(
                f"{n} requests x {cache_len} tokens of KV cache need {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB is free on {self.mesh.devices.flat[0]}: lower max_tokens, "
                "send fewer prompts at once, or lower max_num_seqs"
            )

    def _new_cache(self, batch: int, max_len: int) -> DenseKVCache:
        return _init_cache(self.cfg, batch, max_len, self.dtype)


# One jitted function for the process, so a new batch reuses its compiled program.
_init_cache = jax.jit(DenseKVCache.init, static_argnums=(0, 1, 2, 3))


def _row_logprobs(host, b: int, n: int | None) -> dict[int, float] | None:
    if n is None:
        return None
    out = {int(host.tokens[b]): float(host.logprob[b])}
    if n:
        for tid, lp in zip(host.top_ids[b, :n], host.top_logprobs[b, :n]):
            out.setdefault(int(tid), float(lp))
    return out


def _split_prompt_logprobs(prompt_lp, reqs: list[Request]) -> list[list[dict[int, float] | None]]:
    actual, top_ids, top_lp = jax.device_get(prompt_lp)
    out = []
    for b, r in enumerate(reqs):
        n = r.params.prompt_logprobs
        if n is None:
            out.append(None)
            continue
        per_token: list[dict[int, float] | None] = [None]  # nothing predicts the first token
        for t in range(len(r.prompt_token_ids) - 1):
            d = {int(r.prompt_token_ids[t + 1]): float(actual[b, t])}
            for tid, lp in zip(top_ids[b, t, :n], top_lp[b, t, :n]):
                d.setdefault(int(tid), float(lp))
            per_token.append(d)
        out.append(per_token)
    return out


class _RowState:
    """Host-side bookkeeping of one request: tokens, text, stop conditions."""

    def __init__(self, req: Request, tokenizer: Tokenizer):
        self.req = req
        self.params = req.params
        self.stop_ids = set(self.params.stop_token_ids or ())
        if not self.params.ignore_eos:
            self.stop_ids |= set(tokenizer.stop_token_ids)
        stop = self.params.stop
        self.stops = [stop] if isinstance(stop, str) else list(stop or ())
        # Text that could still become a stop string is held back from the stream.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=self.params.skip_special_tokens)
        self.text = ""  # decoded so far (up to any stop)
        self.emitted = 0  # characters of self.text already streamed
        self.count = 0
        self.finished = False
        self.prompt_logprobs = None

    def add(self, token: int, logprobs) -> StepEvent:
        self.count += 1
        reason = None
        if token in self.stop_ids:
            reason = "stop"  # the stop token is reported in token_ids, not in the text
        else:
            self.text += self.decoder.step(token)
            cut = self._find_stop()
            if cut is not None:
                self.text, reason = self.text[:cut], "stop"
        if reason is None and self.count >= self.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.finished = True
            if reason == "length" or token in self.stop_ids:
                self.text += self.decoder.flush()
                cut = self._find_stop()
                if cut is not None:
                    self.text, reason = self.text[:cut], "stop"
            visible = len(self.text)
        else:
            visible = max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted : visible], visible
        event = StepEvent(self.req.index, token, delta, logprobs, self.finished, reason)
        if self.count == 1:
            event.prompt_logprobs = self.prompt_logprobs
        return event

    def _find_stop(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None
