"""The tokenizer interface the engine and the server program against, and what its
implementations share: their error type and OpenAI's chat-message roles."""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read: the message names it and the fix. A ValueError, so
    that the server reports it as a failed start, as it does a bad checkpoint."""


# How to point at another tokenizer, as an error message's fix says it.
PASS_TOKENIZER = "tokenizer=PATH (--tokenizer PATH)"


def openai_roles(messages: list[dict]) -> list[dict]:
    """OpenAI's `developer` role is its newer name for `system` (what the templates know)."""
    return [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]


class Tokenizer:
    """What the engine needs from a tokenizer."""

    bos_id: int
    eos_id: int
    vocab_size: int
    stop_token_ids: frozenset[int]  # ids that end generation: eos, plus e.g. <|im_end|> for ChatML models
    # The format the model writes tool calls in, by vLLM's --tool-call-parser name ("mistral",
    # "hermes"); None: this tokenizer knows of none.
    tool_call_parser: str | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for OpenAI-shaped messages (and tools), ending where the assistant's reply starts."""
        raise NotImplementedError
