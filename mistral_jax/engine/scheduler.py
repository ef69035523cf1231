"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`) and a seat limit (`max_num_seqs`).
Running sequences come first, oldest first: a decoding sequence takes one token, a sequence
still prefilling takes the next chunk of its prompt that fits the budget (long prompts are thus
prefilled in chunks between other sequences' decode steps). Then waiting sequences are admitted
in arrival order while budget, seats and pages last; a new sequence first takes the pages of its
longest cached prefix, so only the rest is computed.

When pages run out, the newest running sequence is preempted: its pages are freed and it goes
back to the front of the queue, to be recomputed (prompt and the tokens it generated) when pages
free up. Sampling is deterministic per (seed, step), so a recomputed sequence continues exactly.

The host runs one step ahead of the results it has read: a sequence's last sampled token may
still be on the device (`in_flight`) when its next decode step is scheduled; the engine feeds
that token from the device. A sequence under a grammar (structured outputs) is the exception:
its next token's mask is computed on the host from the last one, so it sits out the step
launched while that token is in flight (it decodes every other step; the others keep pace).

Speculative decoding (speculative.py): a decoding sequence may carry proposed tokens (drafts)
after its last one; each of them is also sampled, so a step's sampling rows (one per sequence,
plus one per draft) can outnumber its sequences, up to `max_rows`. A sequence whose drafts are
in flight waits for them to be read (its length is unknown until then); the engine then rolls
its computed length back past the rejected ones.

The scheduler is the only writer of a sequence's scheduling state, at three points of a step:
`schedule()` plans it (admission, preemption, pages, drafts), `launched(plan)` names its full
pages in the prefix cache once the step that writes them is on its way, and `update(plan,
outputs)` takes in what was read back (tokens, accepted drafts, finished requests).
"""

from __future__ import annotations

import collections
import dataclasses

from mistral_jax.cache.page_allocator import OutOfPages, PageAllocator, page_hashes
from mistral_jax.engine.plan import Scheduled, StepOutputs, StepPlan
from mistral_jax.engine.sequence import Sequence, Status

__all__ = ["Scheduled", "Scheduler", "Sequence", "Status"]


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 speculator=None, max_rows: int | None = None):
        self.allocator = allocator
        self.speculator = speculator  # speculative.Speculator, or None
        self.max_rows = max_rows or max_num_seqs
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs))[::-1]
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next step: running sequences first (oldest first), then admissions."""
        budget = self.max_num_batched_tokens
        rows = self.max_rows
        batch: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0 and rows > 0:
            seq = self.running[i]
            if seq.matcher is not None and seq.in_flight:
                i += 1  # its grammar mask waits for the token in flight: it runs next step
                continue
            if seq.spec is not None and seq.in_flight and (seq.spec.pending or not seq.spec.plain_steps):
                i += 1  # its drafts are unread, or its next proposal needs the token in flight
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            draft = self._draft(seq, n, budget, rows)
            if draft and not self._reserve(seq, seq.num_computed + n + len(draft)):
                draft = ()  # no pages for drafts: decode plainly rather than preempt anyone
            while not self._reserve(seq, seq.num_computed + n):
                preempted = True
                victim = self.running[-1]  # the newest; never one already in this batch
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq itself was preempted: everything after it already was
            batch.append(self._take(seq, n, draft))
            budget -= batch[-1].n
            rows -= batch[-1].rows
            i += 1
        while (not preempted and self.waiting and budget > 0 and rows > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_computed == 0 and seq.uses_prefix_cache:
                seq.pages, seq.hashes = self.allocator.match_prefix(seq.token_ids)
                seq.num_registered = len(seq.pages)
                seq.num_computed = len(seq.pages) * self.page_size
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._release(seq)  # give the matched prefix back; try again next step
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.slot = self.free_slots.pop()
            if seq.num_cached_tokens is None:  # first admission: what the cache saved
                seq.num_cached_tokens = seq.num_computed
            self.running.append(seq)
            batch.append(dataclasses.replace(self._take(seq, n), admitted=True))
            budget -= n
            rows -= 1
        return StepPlan(tuple(batch))

    def _draft(self, seq: Sequence, n: int, budget: int, rows: int) -> tuple[int, ...]:
        """Drafts for a decoding sequence whose tokens are all read (else ()), within the step's
        token and row budgets and the request's max_tokens."""
        if seq.spec is None or n != 1 or seq.num_tokens - seq.num_computed != 1:
            return ()
        if seq.spec.plain_steps:  # backing off after misses: plain (pipelined) steps
            seq.spec.plain_steps -= 1
            return ()
        limit = min(budget - 1, rows - 1, seq.params.max_tokens - seq.num_generated - 1)
        return self.speculator.propose(seq.spec, seq.token_ids, limit)

    def _take(self, seq: Sequence, n: int, draft: tuple[int, ...] = ()) -> Scheduled:
        start = seq.num_computed
        sample = start + n == seq.num_tokens
        seq.num_computed += n + len(draft)
        if sample:
            seq.in_flight += 1
        if seq.spec is not None:
            seq.spec.pending = draft
        return Scheduled(seq, start, n + len(draft), sample, draft=draft)

    def _rollback(self, seq: Sequence, rejected: int) -> None:
        """A verify step's rejected drafts: their k/v are past the computed length now (the next
        step overwrites them); the pages stay with the sequence (it grows into them)."""
        if seq.status is Status.RUNNING:
            seq.num_computed -= rejected

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the block table cover num_tokens; False (nothing allocated) if pages ran out."""
        need = -(-num_tokens // self.page_size) - len(seq.pages)
        if need <= 0:
            return True
        try:
            seq.pages += self.allocator.allocate(need)
        except OutOfPages:
            return False
        return True

    # ---- leaving the running set ------------------------------------------------------------

    def _release(self, seq: Sequence) -> None:
        """Give back the sequence's pages and seat; its k/v must be recomputed to run again."""
        if seq.pages:
            self.allocator.free(seq.pages)
        seq.pages, seq.num_computed, seq.num_registered = [], 0, 0
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Finished, stopped or aborted: free its pages at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def drop_all(self) -> list[Sequence]:
        """Every running and waiting sequence leaves (FINISHED), every seat is free and no page
        is referenced: the engine's recovery after a step that raised midway (Engine.abort_all),
        when sequences may hold pages and seats for a step that never launched. The pages are
        released all at once, not sequence by sequence, so that bookkeeping the failure left
        half done cannot leak a page or free one twice. Returns the sequences."""
        seqs = self.running + list(self.waiting)
        for seq in seqs:
            seq.pages, seq.num_computed, seq.num_registered, seq.in_flight, seq.slot = [], 0, 0, 0, -1
            seq.status = Status.FINISHED
        self.running, self.waiting = [], collections.deque()
        self.free_slots = list(range(self.max_num_seqs))[::-1]
        self.allocator.release_all()  # no sequence holds a page now
        return seqs

    # ---- after a step ---------------------------------------------------------------------

    def launched(self, plan: StepPlan) -> None:
        """The plan's step is on its way: its sequences' full pages may be named in the prefix
        cache (a page is only named once the step that writes it has been launched, so a step
        that failed before launching names nothing it did not write)."""
        for s in plan:
            self.register_full_pages(s.seq)

    def update(self, plan: StepPlan, outputs: StepOutputs) -> None:
        """A read step's verdict per sequence (outputs.seqs, aligned with plan): its sampled
        token is no longer in flight; a verify step's rejected drafts are rolled back; the kept
        tokens join the sequence, each one naming the pages it fills, and the one that finished
        the request (if any) frees its pages."""
        for s, out in zip(plan, outputs.seqs, strict=True):
            if out is None:
                continue
            seq = s.seq
            seq.in_flight -= 1
            if s.draft:
                self.speculator.record(seq.spec, len(s.draft), out.accepted)
                self._rollback(seq, len(s.draft) - out.accepted)
            last = len(out.tokens) - 1
            for i, token in enumerate(out.tokens):
                seq.token_ids.append(token)
                if out.finished and i == last:
                    self.finish(seq)
                else:
                    self.register_full_pages(seq)

    def register_full_pages(self, seq: Sequence) -> None:
        """Offer the sequence's pages that are full and whose tokens are known to the prefix
        cache. Safe before the step that writes them has run: later steps run after it."""
        if not self.allocator.enable_prefix_caching or seq.status is not Status.RUNNING:
            return
        full = min(seq.num_computed, len(seq.token_ids)) // self.page_size
        if full <= seq.num_registered:
            return
        seq.hashes = page_hashes(seq.token_ids[: full * self.page_size], self.page_size, seq.hashes[:full])
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.pages[i], seq.hashes[i])
        seq.num_registered = full
