"""Host-side output processing: detokenized text deltas, stop ids and stop strings, events."""

from __future__ import annotations

import dataclasses

from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import StreamDecoder, Tokenizer


@dataclasses.dataclass
class StepEvent:
    """What one request produced in one step (streamed to the caller)."""

    index: int  # position in the caller's list of prompts
    token_id: int | None
    text: str  # new text, possibly "" (held back until it is valid UTF-8 / not a stop prefix)
    logprobs: dict[int, float] | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first event only
    request_id: str = ""
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache (last event)


class OutputState:
    """Host-side bookkeeping of one request: tokens, text, stop conditions."""

    def __init__(self, request_id: str, index: int, params: SamplingParams, tokenizer: Tokenizer):
        self.request_id, self.index = request_id, index
        self.params = params
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

    def add(self, token: int, logprobs, grammar_done: bool = False) -> StepEvent:
        """grammar_done: the request's grammar is complete after this token (structured outputs)."""
        self.count += 1
        reason = None
        if token in self.stop_ids:
            reason = "stop"  # the stop token is reported in token_ids, not in the text
        else:
            self.text += self.decoder.step(token)
            cut = self._find_stop()
            if cut is not None:
                self.text, reason = self.text[:cut], "stop"
        if reason is None and grammar_done:
            reason = "stop"
        if reason is None and self.count >= self.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.finished = True
            if reason == "length" or token in self.stop_ids or grammar_done:
                self.text += self.decoder.flush()
                cut = self._find_stop()
                if cut is not None:
                    self.text, reason = self.text[:cut], "stop"
            visible = len(self.text)
        else:
            visible = max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted : visible], visible
        event = StepEvent(self.index, token, delta, logprobs, self.finished, reason, request_id=self.request_id)
        if self.count == 1:
            event.prompt_logprobs = self.prompt_logprobs
        return event

    def _find_stop(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None
