"""What a request may ask of an engine: its prompt, stop_token_ids and logit_bias within the
vocabulary, its prompt within the context, its prompt and output within the KV cache, its
sampling values within what the engine's step can pack. A plain value, so a front end in
another process (the server's HTTP process) checks requests exactly as the engine does, before
any work starts."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from mistral_jax.sample.sampling import SamplingArrays, SamplingParams, show


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    page_size: int
    num_pages: int  # the cache's pages, page 0 (padding) included

    def check(self, ids: list[int], params: SamplingParams, where: str, rng: np.random.Generator) -> SamplingParams:
        """Reject bad input with a ValueError that names the field and the fix. Returns the
        params the engine runs: a checked copy (the caller's object is never changed) with
        max_tokens=None filled up to the context, seed=None from rng (fixed now, so a preempted
        and recomputed request continues alike) and a top_k past the vocabulary turned off."""
        if len(ids) == 0:
            raise ValueError(f"{where} is empty: give at least one token (the tokenizer adds BOS to text prompts)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # (min and max run in C: this runs per request)
            bad = [show(int(t) if isinstance(t, numbers.Integral) else t) for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(f"{where} has token ids outside [0, {self.vocab_size}): {', '.join(bad[:5])}; "
                             "use ids of this model's tokenizer")
        # A fresh SamplingParams runs every range check again: a caller may have changed a field
        # after construction (a dataclass is mutable), and the step must see only checked values.
        params = dataclasses.replace(params)
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"{where} has {len(ids)} tokens, past the model's context of {self.max_model_len}: "
                f"shorten it to at most {self.max_model_len - 1} tokens")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"{where} has {len(ids)} tokens and asks for max_tokens={show(max_tokens)}: "
                f"{len(ids)} + max_tokens > context {self.max_model_len}. "
                f"Lower max_tokens to {room} or shorten the prompt")
        pages = -(-(len(ids) + max_tokens) // self.page_size)
        if pages > self.num_pages - 1:
            fits = (self.num_pages - 1) * self.page_size
            raise ValueError(
                f"{where} needs {len(ids)} + {max_tokens} tokens of KV cache = {pages} pages of "
                f"{self.page_size}, but the whole cache has {self.num_pages - 1} pages ({fits} tokens): "
                "lower max_tokens, shorten the prompt, or give the cache more memory "
                "(gpu_memory_utilization / num_pages)")
        if params.stop_token_ids and max(params.stop_token_ids) >= self.vocab_size:
            bad = [show(t) for t in params.stop_token_ids if t >= self.vocab_size]
            raise ValueError(
                f"SamplingParams.stop_token_ids has ids outside [0, {self.vocab_size}) (the model cannot "
                f"produce them): {', '.join(bad[:5])}; use ids of this model's tokenizer")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            bad = [show(t) for t in params.logit_bias if t >= self.vocab_size]
            raise ValueError(
                f"SamplingParams.logit_bias has token ids outside [0, {self.vocab_size}) (the model has no such "
                f"token): {', '.join(bad[:5])}; use ids of this model's tokenizer")
        params.max_tokens = max_tokens
        if params.seed is None:
            params.seed = int(rng.integers(2**63))
        if params.top_k >= self.vocab_size:
            params.top_k = 0  # keeps every token: the same as off (and a step without it may skip the sort)
        # The step packs every running request's sampling row into device arrays; one that
        # could not be packed would raise inside the step, after the scheduler moved its state.
        # Pack this row now (the same code), so such a request fails here, before it is queued.
        try:
            SamplingArrays.from_params([params])
        except (ArithmeticError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: its sampling settings cannot be packed for the device ({e}); "
                             "check SamplingParams' ranges") from e
        return params
