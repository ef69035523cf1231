"""A step's host arrays: the plan's tokens, positions, cache slots and sampling rows, packed into
one row of T tokens and S sampling rows (the step's buckets) for the device.

Tokens are packed in plan order, each sequence's own tokens then its drafts. A sequence's
sampling rows follow one another: its last own token's, then one per draft. A decode token that
is still on the device (sampled by the previous, unread step) is not known here: its position
names the previous step's row instead (`prev_index`), and the step reads it on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mistral_jax.engine.buckets import Buckets
from mistral_jax.engine.plan import StepPlan
from mistral_jax.engine.sequence import Sequence
from mistral_jax.engine.step_inputs import StepInputs
from mistral_jax.sample.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class PackedStep:
    inputs: StepInputs  # host arrays: [T] per token, [S] per sampling row
    params: list[SamplingParams]  # [plan.num_rows] each row's request settings
    constrained: list[tuple[int, object]]  # (row, structured.Matcher) of rows under a grammar

    @property
    def num_rows(self) -> int:
        """S, the step's sequence axis."""
        return len(self.inputs.kv_lens)


def pack(plan: StepPlan, prev_rows: dict[Sequence, int], buckets: Buckets, page_size: int,
         no_slot: int) -> PackedStep:
    """prev_rows: each sequence's first sampling row in the previous, unread step (its tokens
    are still on the device); no_slot: the penalty-state row that drops writes (max_num_seqs)."""
    T = buckets.token_bucket(plan.num_tokens)
    S = buckets.seqs(T)
    assert plan.num_rows <= S, "more sampling rows than the step's bucket holds"
    pages = buckets.page_table_width
    tokens = np.zeros(T, np.int32)
    prev_index = np.full(T, -1, np.int32)
    positions = np.full(T, -1, np.int32)
    slot_mapping = np.full(T, -1, np.int32)
    next_ids = np.full(T, -1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    page_indices = np.zeros((S, pages), np.int32)
    cu_q_lens = np.zeros(S + 1, np.int32)
    logits_at = np.zeros(S, np.int32)
    slots = np.full(S, no_slot, np.int32)
    sampled = np.zeros(S, bool)
    step = np.zeros(S, np.int32)
    params, constrained = [], []
    t = r = 0  # the next packed token, the next sampling row
    for i, s in enumerate(plan):
        seq = s.seq
        own = s.own
        if s.n == 1 and not s.draft:  # a decode token: scalars (a NumPy call per field costs more)
            p = s.start
            if p < len(seq.token_ids):
                tokens[t] = seq.token_ids[p]
            else:  # still on the device, from the previous step
                assert p == len(seq.token_ids) and seq in prev_rows, "a decode token is missing"
                prev_index[t] = prev_rows[seq]
            positions[t] = p
            slot_mapping[t] = seq.pages[p // page_size] * page_size + p % page_size
            if seq.params.prompt_logprobs is not None and p + 1 < len(seq.prompt_ids):
                next_ids[t] = seq.prompt_ids[p + 1]
        else:
            pos = np.arange(s.start, s.start + s.n)
            known = min(s.start + own, len(seq.token_ids)) - s.start
            tokens[t : t + known] = seq.token_ids[s.start : s.start + known]
            tokens[t + own : t + s.n] = s.draft
            if known < own:  # the last token is still on the device, from the previous step
                assert known == own - 1 and seq in prev_rows, "a decode token is missing"
                prev_index[t + known] = prev_rows[seq]
            positions[t : t + s.n] = pos
            page_of = np.asarray(seq.pages, np.int32)
            slot_mapping[t : t + s.n] = page_of[pos // page_size] * page_size + pos % page_size
            if seq.params.prompt_logprobs is not None:
                nxt = pos + 1
                ok = nxt < len(seq.prompt_ids)
                next_ids[t : t + s.n][ok] = np.asarray(seq.prompt_ids)[nxt[ok]]
        kv_lens[i] = s.start + s.n
        page_indices[i, : len(seq.pages)] = seq.pages
        cu_q_lens[i + 1] = t + s.n
        for j in range(s.rows):  # the last own token's logits, then each draft's
            logits_at[r + j] = t + own - 1 + j
            slots[r + j] = seq.slot
            sampled[r + j] = s.sample
            step[r + j] = seq.num_generated - 1 + j if s.sample else 0
        params += [seq.params] * s.rows  # draft rows too: logit_bias and the rest apply at every position
        if s.sample and seq.matcher is not None:
            constrained.append((r, seq.matcher))
        t += s.n
        r += s.rows
    cu_q_lens[len(plan) + 1 :] = t
    inputs = StepInputs(tokens, prev_index, positions, slot_mapping, next_ids, kv_lens, page_indices, cu_q_lens,
                        np.int32(len(plan)), logits_at, slots, sampled, step)
    return PackedStep(inputs, params, constrained)
