"""A request as the engine tracks it: its tokens, its place in the KV cache, its scheduling state.

Only the scheduler writes a sequence's scheduling state (status, num_computed, in_flight, pages,
slot, token_ids, spec): `Scheduler.schedule` when it plans a step, `Scheduler.update` when the
step's tokens are read. The model runner and the output processor only read it.
"""

from __future__ import annotations

import dataclasses
import enum

from mistral_jax.sample.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0  # position in the caller's list of prompts
    token_ids: list[int] = dataclasses.field(default_factory=list)  # prompt + generated, as read
    num_computed: int = 0  # tokens whose k/v are written, or being written by a launched step
    in_flight: int = 0  # sampled tokens launched but not read yet
    pages: list[int] = dataclasses.field(default_factory=list)  # block table
    hashes: list[int] = dataclasses.field(default_factory=list)  # chained hashes of full pages
    num_registered: int = 0  # leading pages offered to the prefix cache
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served (first admission)
    num_preemptions: int = 0
    slot: int = -1  # row of the persistent per-sequence sampling state
    matcher: object = None  # structured.Matcher: its next mask needs its last token on the host
    spec: object = None  # speculative.SpecState when the sequence speculates
    status: Status = Status.WAITING

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has, including sampled ones not read yet."""
        return len(self.token_ids) + self.in_flight

    @property
    def num_generated(self) -> int:
        return self.num_tokens - len(self.prompt_ids)

    @property
    def uses_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def uses_prefix_cache(self) -> bool:
        # Prompt logprobs need the logits of every prompt position: compute them all.
        return self.params.prompt_logprobs is None
