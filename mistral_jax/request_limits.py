"""What a request may ask of an engine: its prompt within the vocabulary and the context, its
prompt and output within the KV cache. A plain value, so a front end in another process (the
server's HTTP process) checks requests exactly as the engine does, before any work starts."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    page_size: int
    num_pages: int  # the cache's pages, page 0 (padding) included

    def check(self, ids: list[int], params: SamplingParams, where: str, rng: np.random.Generator) -> SamplingParams:
        """Reject bad input with a ValueError that names the fix; fill max_tokens=None up to the
        context and seed=None from rng (fixed now, so a preempted and recomputed request
        continues alike)."""
        if len(ids) == 0:
            raise ValueError(f"{where} is empty: give at least one token (the tokenizer adds BOS to text prompts)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # (min and max run in C: this runs per request)
            bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
            raise ValueError(f"{where} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"{where} has {len(ids)} tokens, past the model's context of {self.max_model_len}: "
                f"shorten it to at most {self.max_model_len - 1} tokens")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"{where} has {len(ids)} tokens and asks for max_tokens={max_tokens}: "
                f"{len(ids)} + {max_tokens} > context {self.max_model_len}. "
                f"Lower max_tokens to {room} or shorten the prompt")
        pages = -(-(len(ids) + max_tokens) // self.page_size)
        if pages > self.num_pages - 1:
            fits = (self.num_pages - 1) * self.page_size
            raise ValueError(
                f"{where} needs {len(ids)} + {max_tokens} tokens of KV cache = {pages} pages of "
                f"{self.page_size}, but the whole cache has {self.num_pages - 1} pages ({fits} tokens): "
                "lower max_tokens, shorten the prompt, or give the cache more memory "
                "(gpu_memory_utilization / num_pages)")
        if params.max_tokens is None or params.seed is None:
            params = copy.copy(params)  # the values are valid: no second pass of SamplingParams' checks
            params.max_tokens = max_tokens
            if params.seed is None:
                params.seed = int(rng.integers(2**63))
        return params
