"""OpenAI's `usage` of a response: prompt, completion and cached tokens.

Choices are numbered index = prompt * n + c (c < n, the request's choices per prompt). Invariant:
a prompt's tokens, and its cached ones, count once however many choices it has (its first choice,
c = 0, carries them), so cached_tokens never exceed prompt_tokens; every generated token counts
once in completion_tokens."""

from __future__ import annotations

from mistral_jax.engine.outputs import StepEvent


class Usage:
    def __init__(self, n: int = 1):
        self.n = n
        self.prompt = self.completion = self.cached = 0
        self._prompts_seen: set[int] = set()

    def add_result(self, index: int, prompt_ids, generated, cached: int) -> None:
        """A finished choice of a non-streamed response: its generated ids, and the prompt's tokens
        the prefix cache served."""
        if index % self.n == 0:
            self.prompt += len(prompt_ids)
            self.cached += cached
        self.completion += len(generated)

    def add_event(self, index: int, prompt_ids, event: StepEvent) -> None:
        """One streamed token of choice `index` (the prompt counts at its first choice's first
        token; the cached tokens with its last)."""
        if index % self.n == 0 and index // self.n not in self._prompts_seen:
            self._prompts_seen.add(index // self.n)
            self.prompt += len(prompt_ids)
        self.completion += 1
        if event.finished and index % self.n == 0:
            self.cached += event.num_cached_tokens or 0

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}
