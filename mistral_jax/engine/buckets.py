"""The shapes of the engine's program set: every step is padded to a bucket, so a known, small
set of programs serves any mix of requests (and `warmup()` can compile them all up front).

- tokens: powers of two up to max_num_batched_tokens (T);
- sequences: a step's sequence axis (sampling rows, the head's rows) is tied to its token bucket,
  since a step of T tokens holds at most T rows: seqs(T) adds no program;
- block table: one full width for every step (the attention reads only as far as each kv_len,
  so its width costs nothing and adds no program);
- draft rows (draft-model speculation): powers of two, from MIN_SEQS_BUCKET on every backend.

Why the minimums differ between an accelerator and a CPU (measurements: docs/performance.md):
an accelerator's decode streams the weights whatever the row count, so padded rows cost next to
nothing and small batches share one program; a CPU is compute-bound, so every padded row costs
its share of the matmuls and of the head.
"""

from __future__ import annotations

import dataclasses

# The smallest step in tokens: small batches share one program on an accelerator; on a CPU a
# batch-1 decode step runs one token, not 16.
MIN_TOKEN_BUCKET = 16
MIN_TOKEN_BUCKET_CPU = 1
# ... except one sequence's decode, the latency-critical step: on an accelerator a step of one
# token has its own program too (no empty prefill-attention launch, products of one row).
ONE_TOKEN_PROGRAM = True
# The smallest sequence axis: on a CPU each padded row costs its share of the head and attention.
MIN_SEQS_BUCKET = 8
MIN_SEQS_BUCKET_CPU = 1
MIN_PAGES_BUCKET = 4


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Round n up to a power of two (at least `minimum`), capped at `maximum`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum) if maximum is not None else b


def powers_of_two(lo: int, hi: int) -> list[int]:
    """The buckets bucket() rounds to between lo and hi (both included; hi need not be a power)."""
    out = [lo]
    while out[-1] < hi:
        out.append(min(out[-1] * 2, hi))
    return out


@dataclasses.dataclass(frozen=True)
class Buckets:
    tokens: tuple[int, ...]  # step sizes in tokens, ascending
    min_seqs: int  # the smallest sequence axis
    max_seqs: int  # the largest: max_num_seqs rounded up
    page_table_width: int  # pages per block-table row, for every step
    penalty_ids: int  # length of a penalty-row reset's token array (one shape: one program)

    @classmethod
    def make(cls, *, on_cpu: bool, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
             page_size: int) -> Buckets:
        min_tokens = MIN_TOKEN_BUCKET_CPU if on_cpu else MIN_TOKEN_BUCKET
        tokens = powers_of_two(min_tokens, bucket(max_num_batched_tokens, min_tokens))
        if ONE_TOKEN_PROGRAM and tokens[0] > 1:
            tokens.insert(0, 1)
        min_seqs = MIN_SEQS_BUCKET_CPU if on_cpu else MIN_SEQS_BUCKET
        return cls(tokens=tuple(tokens), min_seqs=min_seqs, max_seqs=bucket(max_num_seqs, min_seqs),
                   page_table_width=bucket(-(-max_model_len // page_size), MIN_PAGES_BUCKET),
                   penalty_ids=bucket(max_model_len, MIN_TOKEN_BUCKET))

    def token_bucket(self, n: int) -> int:
        """The step size (T) for n tokens."""
        return next(b for b in self.tokens if b >= n)

    def seqs(self, tokens: int) -> int:
        """The sequence axis (S) of a step of `tokens` (a bucket): at most that many sequences,
        and at most max_num_seqs (rounded up); at least min_seqs."""
        return min(max(tokens, self.min_seqs), self.max_seqs)

    def seqs_buckets(self) -> list[int]:
        return sorted({self.seqs(T) for T in self.tokens})

    def draft_rows(self, n: int) -> int:
        """The row axis of a draft-model proposal for n sequences (few programs on every backend)."""
        return bucket(n, MIN_SEQS_BUCKET, self.max_seqs)

    def draft_row_buckets(self) -> list[int]:
        return powers_of_two(self.draft_rows(1), self.max_seqs)
