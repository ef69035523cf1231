"""Streaming detokenization: generated ids to text, one token at a time."""

from __future__ import annotations

from mistral_jax.tokenizer.base import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens decoded ahead of the first generated one (vLLM uses 5)
_WINDOW = 6  # tokens a step decodes at most before its window restarts (plus the restart's context)


class StreamDecoder:
    """Incremental detokenization (the prefix/read offset technique of vLLM and TGI).

    Each step decodes a window of recent tokens (from `prefix`) and emits what it adds to the
    text the same window gave when the last text was emitted (kept, so one decode a step: the
    tokenizer call is most of a step's host time per sequence at large batches). Decoding in
    context keeps the leading space a token gets from its neighbour (SentencePiece drops it on
    the first piece of a decode), and text is held back while it ends with U+FFFD, i.e. while a
    multi-byte character is still incomplete. Once the window spans _WINDOW tokens it restarts
    at the tokens emitted last, which are the next text's context (one more decode then).

    Without prompt_ids, "".join(steps) + flush() == tokenizer.decode(all ids). With prompt_ids, the
    first token decodes after the prompt's tail, so its leading space is kept (as vLLM does).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])[-_PROMPT_CONTEXT:]
        self.prefix = 0  # window start: tokens already emitted, decoded again for context
        self.read = len(self.ids)  # tokens before this index have been emitted
        self.text = self._decode(self.ids) if self.ids else ""  # the window's text up to `read`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(self.text) or after.endswith("\ufffd"):
            return ""  # nothing printable yet (a special token, or half a character)
        new = after[len(self.text):]
        if len(self.ids) - self.prefix > _WINDOW:  # restart at the tokens emitted now
            self.prefix = self.read
            after = self._decode(self.ids[self.prefix:])
        self.read, self.text = len(self.ids), after
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character, as U+FFFD)."""
        after = self._decode(self.ids[self.prefix:])
        new = after[len(self.text):]
        self.read, self.text = len(self.ids), after
        return new
