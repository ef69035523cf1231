"""The typed hand-offs between the engine's stages, one step at a time:

    Scheduler.schedule() -> StepPlan                   which sequences, which tokens, which drafts
    ModelRunner.launch(plan) -> Launched               the step on the device (not waited for)
    ModelRunner.collect(launched) -> StepResult        its sampled tokens, read to the host
    OutputProcessor.process(plan, result) -> StepOutputs   events, and what each sequence keeps
    Scheduler.update(plan, outputs)                    the sequences' state moves on

A plan is fixed once made (drafts are filled in by making a new one); the sequences it names are
the scheduler's, and only the scheduler changes them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from mistral_jax.engine.outputs import StepEvent

if TYPE_CHECKING:
    from mistral_jax.engine.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """One sequence's share of a step: tokens [start, start + n) of the sequence, its own ones
    first, then its drafts."""

    seq: Sequence
    start: int
    n: int
    sample: bool  # the chunk reaches the sequence's end: its last token's logits are sampled
    admitted: bool = False  # the sequence (re)entered the running set with this step
    draft: tuple[int, ...] = ()  # proposed tokens, the chunk's last len(draft) (each one sampled too)

    @property
    def own(self) -> int:
        """The sequence's own tokens in the chunk (the rest are drafts)."""
        return self.n - len(self.draft)

    @property
    def rows(self) -> int:
        """Sampling rows: the last own token's, and one per draft."""
        return 1 + len(self.draft)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step: its sequences in packing order. Tokens are packed in this order, and so are
    sampling rows (a sequence's first row is `first_rows[i]`)."""

    seqs: tuple[Scheduled, ...] = ()

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[Scheduled]:
        return iter(self.seqs)

    def __getitem__(self, i: int) -> Scheduled:
        return self.seqs[i]

    @functools.cached_property
    def num_tokens(self) -> int:
        return sum(s.n for s in self.seqs)

    @functools.cached_property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.seqs)

    @functools.cached_property
    def first_rows(self) -> tuple[int, ...]:
        """Each sequence's first sampling row."""
        return tuple(itertools.accumulate((s.rows for s in self.seqs[:-1]), initial=0)) if self.seqs else ()

    @property
    def wants_top_logprobs(self) -> bool:
        return any(s.sample and s.seq.params.logprobs for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return any(s.seq.params.prompt_logprobs is not None and s.start < len(s.seq.prompt_ids) for s in self.seqs)

    def with_drafts(self, drafts: dict[int, tuple[int, ...]]) -> StepPlan:
        """The same plan with sequence i's drafts replaced by drafts[i] (of the same length)."""
        seqs = list(self.seqs)
        for i, draft in drafts.items():
            assert len(draft) == len(seqs[i].draft), "a filled draft keeps the planned length"
            seqs[i] = dataclasses.replace(seqs[i], draft=draft)
        return StepPlan(tuple(seqs))


@dataclasses.dataclass(frozen=True)
class StepResult:
    """A launched step's outputs, on the host. Rows are the plan's sampling rows (padded to the
    step's bucket S); positions are its packed tokens (padded to its bucket T)."""

    tokens: np.ndarray  # [S] i32 the token sampled at each row
    logprob: np.ndarray  # [S] f32 its log-probability under the raw logits
    top: tuple[np.ndarray, np.ndarray] | None = None  # ([S, n] f32 logprobs, [S, n] i32 ids), if asked
    # (log p(next prompt token) [T] f32, top ids [T, n] i32, their logprobs [T, n] f32), if asked
    prompt: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class SeqOutput:
    """What a sampled sequence keeps from a step (the output processor's verdict)."""

    tokens: tuple[int, ...]  # kept tokens in order; none after the one that finished it
    accepted: int = 0  # drafts the target sampled too (all of them count, even past a stop)
    finished: bool = False  # the last kept token ends the request


@dataclasses.dataclass(frozen=True)
class StepOutputs:
    events: list[StepEvent]  # in plan order, then token order
    seqs: tuple[SeqOutput | None, ...]  # per plan entry; None: nothing sampled, or already finished
