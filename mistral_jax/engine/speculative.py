"""Speculative decoding: proposed tokens checked by the target model in one step, exactly.

A speculating sequence's decode step carries its last token plus k proposed ones (the drafts).
The step samples a token at each of the k + 1 positions, as k + 1 plain steps would: the same
logits given the same prefix, and the same per-(seed, step) noise (sampling.py). The host keeps
the drafts while they equal what was sampled at the position before them, then the first
sampled token that differs (or the bonus token after all k): 1 to k + 1 tokens per step, the
tokens plain decoding gives, greedy or seeded sampling alike. The k/v written for rejected
drafts lie past the sequence's computed length; the next step overwrites them.

Why this is rejection sampling. The proposers here give point masses, q = delta(d). Standard
speculative sampling accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise draws
from norm(max(p - q, 0)), which is p without d. Drawing t ~ p and accepting iff t == d does
exactly that: the accept probability is p(d), and a rejected t is distributed as p given t != d.
So the output distribution is the target's (tests/test_speculative.py checks it by chi-square).
Each of the k + 1 sampling rows carries its request's SamplingParams (packing.py), logit_bias
included, so each position is sampled from the biased distribution a plain step would use; the
proposers ignore the bias (a draft that a bias of -100 bans is all but never sampled, so it is
rejected): the kept tokens are those plain decoding under the bias gives.

Proposers:
- ngram (prompt lookup): the longest suffix of the sequence (prompt_lookup_min..max tokens) that
  occurred before, and the tokens that followed its latest occurrence. No weights, no device work.
- draft_model: a smaller model with the same vocabulary, decoding greedily (draft.py); the
  scheduler reserves room for k drafts and the model runner fills them in before the step.

Cost control. A sequence whose drafts are on the device cannot be scheduled until they are read
(its length is unknown), so speculation gives up the engine's one-step-ahead pipelining for that
sequence. When its proposals keep missing (no match, or no draft kept), it backs off: it runs
plain pipelined steps, doubling their number each miss (up to MAX_BACKOFF), before it waits to
propose again.
"""

from __future__ import annotations

import dataclasses
import json
import numbers

import numpy as np

METHODS = ("ngram", "draft_model")
UNFILLED = -1  # a draft_model draft, before the model runner fills it in
MAX_BACKOFF = 16  # plain steps between proposals after repeated misses


@dataclasses.dataclass
class SpeculativeConfig:
    """vLLM's names. method "ngram": prompt lookup over the sequence's own tokens;
    "draft_model": `model` (a checkpoint path) proposes."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method={self.method!r} is not supported: use one of {METHODS}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError(f"speculative_config model={self.model!r} with method={self.method!r}: the "
                             "draft_model method needs a model (a checkpoint path); ngram takes none")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens={k!r} is invalid: use an integer in "
                             "[1, 16] (3-5 is typical)")
        if self.prompt_lookup_max is None and self.prompt_lookup_min is None:
            self.prompt_lookup_min, self.prompt_lookup_max = 2, 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = min(2, self.prompt_lookup_max)
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = max(5, self.prompt_lookup_min)
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
            raise ValueError(f"speculative_config prompt_lookup_min={lo!r}, prompt_lookup_max={hi!r} are invalid: "
                             "use integers with 1 <= prompt_lookup_min <= prompt_lookup_max (e.g. 2 and 5)")

    @classmethod
    def parse(cls, spec) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a dict of vLLM's keys, or that dict as JSON text (the CLI)."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e}): pass e.g. "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(spec).__name__}")
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {sorted(unknown)}: the keys are "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        for key in ("method", "num_speculative_tokens"):
            if key not in spec:
                raise ValueError(f"speculative_config needs {key!r}, e.g. "
                                 '{"method": "ngram", "num_speculative_tokens": 4}')
        return cls(**spec)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def ngram_propose(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> np.ndarray:
    """Prompt lookup. tokens: [N] i32 (prompt + output so far). Find the longest n in
    [n_min, n_max] whose last-n tokens occurred earlier (followed by at least one token); return
    the k tokens that followed its latest occurrence with k tokens after it, else as many as
    followed its latest occurrence ([0] if none). (The very latest occurrence of a repeating
    pattern overlaps the suffix and would propose a single token.)

    Candidates are kept by where the match ends (`ends`: the index right after it), so growing n
    by one only compares one more token of each surviving candidate."""
    N = len(tokens)
    if N < n_min + 1 or k < 1:
        return tokens[:0]
    ends = np.flatnonzero(tokens[: N - 1] == tokens[N - 1]) + 1  # matches of length 1, end before N
    best = None
    for n in range(1, n_max + 1):
        if n > 1:
            ends = ends[ends - n >= 0]
            ends = ends[tokens[ends - n] == tokens[N - n]]
        if len(ends) == 0:
            break
        if n >= n_min:
            whole = ends[ends <= N - k]  # occurrences with k tokens after them
            best = whole[-1] if len(whole) else ends[-1]
    if best is None:
        return tokens[:0]
    return tokens[best : best + k]


@dataclasses.dataclass
class SpecState:
    """One sequence's speculation: its tokens as an array (grown, not rebuilt), the drafts of
    its launched step, and the back-off after misses."""

    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(64, np.int32))
    length: int = 0
    pending: tuple[int, ...] = ()  # drafts of the launched, unread step
    plain_steps: int = 0  # pipelined plain steps left before the next proposal
    backoff: int = 0  # plain steps after the next miss (0 = propose every step)

    def sync(self, token_ids: list[int]) -> np.ndarray:
        n = len(token_ids)
        if n > len(self.tokens):
            grown = np.zeros(max(n, 2 * len(self.tokens)), np.int32)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        if n > self.length:
            self.tokens[self.length : n] = token_ids[self.length : n]
        self.length = n
        return self.tokens[:n]

    def missed(self) -> None:
        self.backoff = min(2 * self.backoff, MAX_BACKOFF) if self.backoff else 1
        self.plain_steps = self.backoff

    def hit(self) -> None:
        self.backoff = self.plain_steps = 0


@dataclasses.dataclass
class SpecStats:
    """vLLM's counters: steps that carried drafts, drafts proposed, drafts accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step (accepted drafts + the one sampled)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


class Speculator:
    """Proposals for the scheduler, and the record of what verify steps kept."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.stats = SpecStats()

    def propose(self, state: SpecState, token_ids: list[int], limit: int) -> tuple[int, ...]:
        """Up to min(k, limit) drafts after token_ids; () (and a back-off) on no match."""
        k = min(self.config.num_speculative_tokens, limit)
        if k < 1:
            return ()
        if self.config.method == "draft_model":
            return (UNFILLED,) * k
        draft = ngram_propose(state.sync(token_ids), k, self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        if len(draft) == 0:
            state.missed()
            return ()
        return tuple(int(t) for t in draft)

    def record(self, state: SpecState, num_drafts: int, accepted: int) -> None:
        """A verify step was read: count it, and back off after a miss. Keeping one draft (two
        tokens from one step) already pays for the verify step's extra cost (its rows, and the
        one-step-ahead pipelining it gives up: docs/performance.md); keeping none is a miss."""
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += accepted
        state.pending = ()
        if accepted:
            state.hit()
        else:
            state.missed()


def accepted_drafts(draft: tuple[int, ...], sampled) -> int:
    """sampled: the target's tokens at the len(draft) + 1 positions of a verify step. How many
    drafts are kept: the leading ones equal to the token sampled before them."""
    a = 0
    while a < len(draft) and int(sampled[a]) == draft[a]:
        a += 1
    return a
