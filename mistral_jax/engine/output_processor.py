"""A read step -> what the caller sees (StepEvents) and what each sequence keeps (SeqOutput).

Per sampled sequence, in plan order: the drafts the target sampled too are kept (speculative
decoding), then each kept token goes through the request's grammar (structured outputs) and its
OutputState (detokenized text, stop ids and strings, max_tokens); the first token that finishes
the request is its last. Prompt logprobs are gathered over the steps that prefill a request, and
ride on its first event. Sequences finished after their step was launched (aborted, or stopped
by an earlier step) are skipped: their output is dropped.

The processor changes no scheduling state: the scheduler takes its verdict (`Scheduler.update`).
"""

from __future__ import annotations

from mistral_jax.engine.outputs import OutputState, StepEvent
from mistral_jax.engine.plan import Scheduled, SeqOutput, StepOutputs, StepPlan, StepResult
from mistral_jax.engine.sequence import Sequence, Status
from mistral_jax.engine.speculative import accepted_drafts
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, OutputState] = {}  # request id -> its output so far
        # request id -> {prompt position p: {token id: logprob}} for p gathered so far
        self._prompt_lps: dict[str, dict[int, dict[int, float]]] = {}

    def add(self, request_id: str, index: int, params: SamplingParams) -> None:
        self.states[request_id] = OutputState(request_id, index, params, self.tokenizer)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self._prompt_lps.pop(request_id, None)

    def clear(self) -> None:
        self.states.clear()
        self._prompt_lps.clear()

    def process(self, plan: StepPlan, result: StepResult) -> StepOutputs:
        events: list[StepEvent] = []
        seqs: list[SeqOutput | None] = []
        t = 0  # the sequence's first packed token
        for s, row in zip(plan, plan.first_rows):
            seq = s.seq
            packed = slice(t, t + s.n)
            t += s.n
            out = None
            if seq.status is not Status.FINISHED:
                if result.prompt is not None and seq.params.prompt_logprobs is not None:
                    self._collect_prompt_logprobs(seq, s, packed, result.prompt)
                if s.sample:
                    out = self._sequence(s, row, result, events)
            seqs.append(out)
        return StepOutputs(events, tuple(seqs))

    def _sequence(self, s: Scheduled, row: int, result: StepResult, events: list[StepEvent]) -> SeqOutput:
        """A sampled sequence's rows [row, row + s.rows): its kept tokens and their events."""
        seq = s.seq
        accepted = accepted_drafts(s.draft, result.tokens[row : row + s.rows]) if s.draft else 0
        kept: list[int] = []
        for r in range(row, row + 1 + accepted):  # the accepted drafts, then the token after them
            token = int(result.tokens[r])
            event = self._emit(seq, token, _row_logprobs(result, r, seq.params.logprobs))
            events.append(event)
            kept.append(token)
            if event.finished:
                return SeqOutput(tuple(kept), accepted, finished=True)
        return SeqOutput(tuple(kept), accepted)

    def _emit(self, seq: Sequence, token: int, logprobs) -> StepEvent:
        """One kept token of a sequence -> its event; a finished request's output state goes."""
        out = self.states[seq.request_id]
        # The grammar is done when it has stopped, or if it rejects the token (only if the
        # mask allowed nothing: the request ends rather than leaving its grammar).
        done = seq.matcher is not None and (not seq.matcher.accept(token) or seq.matcher.stopped)
        event = out.add(token, logprobs, grammar_done=done)
        if out.count == 1 and seq.params.prompt_logprobs is not None:
            event.prompt_logprobs = self._finish_prompt_logprobs(seq)
        if event.finished:
            event.num_cached_tokens = seq.num_cached_tokens or 0
            self.states.pop(seq.request_id, None)
        return event

    def _collect_prompt_logprobs(self, seq: Sequence, s: Scheduled, rows: slice, prompt_lp) -> None:
        actual, top_ids, top_lp = prompt_lp  # [T], [T, n], [T, n]
        n = seq.params.prompt_logprobs
        got = self._prompt_lps.setdefault(seq.request_id, {})
        for r, pos in zip(range(rows.start, rows.stop), range(s.start, s.start + s.n)):
            if pos + 1 < len(seq.prompt_ids):  # entry for prompt token pos + 1
                d = {seq.prompt_ids[pos + 1]: float(actual[r])}
                for tid, lp in zip(top_ids[r, :n], top_lp[r, :n]):
                    d.setdefault(int(tid), float(lp))
                got[pos + 1] = d

    def _finish_prompt_logprobs(self, seq: Sequence) -> list[dict[int, float] | None]:
        got = self._prompt_lps.pop(seq.request_id, {})
        return [None] + [got.get(p) for p in range(1, len(seq.prompt_ids))]  # nothing predicts token 0


def _row_logprobs(result: StepResult, b: int, n: int | None) -> dict[int, float] | None:
    """Row b's logprobs for a request asking for n alternatives: the chosen token's, then the
    top n (result.top: the step's (logprobs, ids) from _top_logprobs)."""
    if n is None:
        return None
    out = {int(result.tokens[b]): float(result.logprob[b])}
    if n:
        top_lp, top_ids = result.top
        for tid, lp in zip(top_ids[b, :n], top_lp[b, :n]):
            out.setdefault(int(tid), float(lp))
    return out
