"""The engine's stages and their hand-offs, without a model (plan.py): Scheduler.schedule ->
StepPlan, OutputProcessor.process(plan, StepResult) -> StepOutputs, Scheduler.update(plan,
outputs); then, on the tiny model, the engine's one-step-ahead loop over them."""

import dataclasses

import numpy as np
import pytest

from mistral_jax.cache.page_allocator import PageAllocator
from mistral_jax.engine.buckets import Buckets
from mistral_jax.engine.output_processor import OutputProcessor
from mistral_jax.engine.packing import pack
from mistral_jax.engine.plan import Scheduled, SeqOutput, StepOutputs, StepPlan, StepResult
from mistral_jax.engine.scheduler import Scheduler, Sequence, Status
from mistral_jax.engine.speculative import SpecState, SpeculativeConfig, Speculator
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import Tokenizer

PAGE = 4
STOP = 2


class Letters(Tokenizer):
    """Token id i is the letter chr(ord('a') + i % 26); id 2 stops."""

    bos_id, eos_id, stop_token_ids = 1, STOP, frozenset({STOP})

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if i != STOP)


def scheduler(budget=16, max_num_seqs=4, num_pages=32, speculator=None):
    return Scheduler(PageAllocator(num_pages, PAGE, True), max_num_seqs, budget, speculator=speculator)


def state(seq: Sequence) -> tuple:
    """Everything the scheduler owns of a sequence."""
    spec = dataclasses.astuple(seq.spec) if seq.spec is not None else None
    return (list(seq.token_ids), seq.num_computed, seq.in_flight, list(seq.pages), seq.num_registered, seq.slot,
            seq.status, repr(spec))


def result(tokens, rows=8) -> StepResult:
    """A fake step's result: `tokens` at the first rows, then padding."""
    out = np.zeros(rows, np.int32)
    out[: len(tokens)] = tokens
    return StepResult(out, np.zeros(rows, np.float32))


# ---- StepPlan --------------------------------------------------------------------------------


def test_a_plan_counts_its_tokens_and_rows_and_is_fixed():
    a, b, c = (Sequence(str(i), [5] * 6, SamplingParams(max_tokens=4)) for i in range(3))
    plan = StepPlan((Scheduled(a, 0, 6, True), Scheduled(b, 6, 4, True, draft=(7, 8, 9)), Scheduled(c, 0, 3, False)))
    assert (plan.num_tokens, plan.num_rows, plan.first_rows) == (13, 6, (0, 1, 5))
    assert plan[1].own == 1 and plan[1].rows == 4
    filled = plan.with_drafts({1: (10, 11, 12)})
    assert filled[1].draft == (10, 11, 12) and plan[1].draft == (7, 8, 9)  # a new plan; the old one stands
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan[0].n = 2
    with pytest.raises(AssertionError):
        plan.with_drafts({1: (10,)})  # a filled draft keeps the planned length


def test_schedule_returns_a_plan_within_the_budget_prefilling_in_chunks():
    sched = scheduler(budget=10)
    seqs = [Sequence(str(i), list(range(10, 10 + n)), SamplingParams(max_tokens=3)) for i, n in enumerate((7, 6))]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [(s.seq.request_id, s.start, s.n, s.sample, s.admitted) for s in plan] == \
           [("0", 0, 7, True, True), ("1", 0, 3, False, True)]  # the second prompt's first chunk
    assert plan.num_tokens == 10 and seqs[0].in_flight == 1 and seqs[1].in_flight == 0


def test_packing_follows_the_plan():
    """Tokens in plan order, each sequence's rows after its last own token; a decode token still
    on the device is read from the previous step's row."""
    seqs = [Sequence(str(i), [20 + i] * 5, SamplingParams(max_tokens=3)) for i in range(2)]
    for i, seq in enumerate(seqs):
        seq.pages, seq.slot = [1 + 2 * i, 2 + 2 * i], i
    seqs[1].in_flight = 1  # its 6th token is on the device, row 3 of the previous step
    plan = StepPlan((Scheduled(seqs[0], 3, 2, True), Scheduled(seqs[1], 5, 1, True)))
    buckets = Buckets.make(on_cpu=True, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=16, page_size=PAGE)
    p = pack(plan, {seqs[1]: 3}, buckets, PAGE, no_slot=4).inputs
    assert p.tokens[:3].tolist() == [20, 20, 0] and p.prev_index[:3].tolist() == [-1, -1, 3]
    assert p.positions[:3].tolist() == [3, 4, 5] and p.slot_mapping[:3].tolist() == [7, 8, 17]
    assert p.logits_at[:2].tolist() == [1, 2] and p.cu_q_lens[:3].tolist() == [0, 2, 3]
    with pytest.raises(AssertionError, match="a decode token is missing"):
        pack(plan, {}, buckets, PAGE, no_slot=4)


# ---- schedule -> process -> update -------------------------------------------------------------


def test_only_update_writes_a_sequences_state():
    sched, proc = scheduler(), OutputProcessor(Letters())
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=3))
    proc.add("r", 0, seq.params)
    sched.add(seq)
    plan = sched.schedule()
    sched.launched(plan)
    before = state(seq)
    outputs = proc.process(plan, result([8]))
    assert state(seq) == before  # the output processor read, and wrote nothing
    assert outputs.seqs == (SeqOutput((8,), 0, False),) and [e.token_id for e in outputs.events] == [8]
    sched.update(plan, outputs)
    assert seq.token_ids == [5, 6, 7, 8] and seq.in_flight == 0 and seq.num_computed == 3


def test_a_stop_token_ends_the_request_and_frees_its_pages():
    sched, proc = scheduler(), OutputProcessor(Letters())
    seq = Sequence("r", [5, 6, 7, 8, 9], SamplingParams(max_tokens=5))
    proc.add("r", 0, seq.params)
    sched.add(seq)
    free = sched.allocator.num_free_pages
    plan = sched.schedule()
    outputs = proc.process(plan, result([STOP]))
    (event,) = outputs.events
    assert event.finished and event.finish_reason == "stop" and event.text == ""
    assert outputs.seqs[0].finished and "r" not in proc.states
    sched.update(plan, outputs)
    assert seq.status is Status.FINISHED and seq.token_ids[-1] == STOP and not sched.running
    assert sched.allocator.num_free_pages + len(sched.allocator.evictable) >= free


def test_a_stop_string_and_max_tokens():
    proc = OutputProcessor(Letters())
    stop = Sequence("s", [1], SamplingParams(max_tokens=9, stop="cd"))
    length = Sequence("l", [1], SamplingParams(max_tokens=2))
    for seq in (stop, length):
        seq.status = Status.RUNNING
        proc.add(seq.request_id, 0, seq.params)
    text = {"s": "", "l": ""}
    for token in (0, 2 + 26, 3):  # a, (c: id 28), d
        plan = StepPlan(tuple(Scheduled(s, 0, 1, True) for s in (stop, length) if s.request_id in proc.states))
        out = proc.process(plan, result([token] * len(plan)))
        for e in out.events:
            text[e.request_id] += e.text
            if e.finished:
                assert (e.request_id, e.finish_reason) in {("s", "stop"), ("l", "length")}
    assert text == {"s": "a", "l": "ac"}  # "cd" cut from the text; "ac" held back, then flushed at the end


def test_drafts_kept_up_to_a_stop_and_rejected_ones_rolled_back():
    """A verify step keeps the drafts the target sampled too, then the token after them; a stop
    among them ends the request there. Rejected drafts roll the computed length back."""
    spec = Speculator(SpeculativeConfig("ngram", 3))
    sched, proc = scheduler(speculator=spec), OutputProcessor(Letters())
    seqs = []
    for rid in "ab":
        seq = Sequence(rid, [5, 6, 7], SamplingParams(max_tokens=8))
        seq.spec = SpecState()
        proc.add(rid, 0, seq.params)
        sched.add(seq)
        seqs.append(seq)
    sched.update(plan := sched.schedule(), proc.process(plan, result([9, 9])))  # prefill: both read 9
    a, b = seqs
    verify = StepPlan((Scheduled(a, 3, 4, True, draft=(10, 11, 12)), Scheduled(b, 3, 4, True, draft=(10, STOP, 12))))
    for seq in seqs:  # as schedule() leaves a verify step
        seq.num_computed, seq.in_flight, seq.pages = 7, 1, seq.pages + sched.allocator.allocate(1)
    # a: drafts 10, 11 accepted, 12 rejected (13 sampled instead); b: all 3 accepted, the 2nd a stop
    outputs = proc.process(verify, result([10, 11, 13, 99, 10, STOP, 12, 1]))
    assert outputs.seqs == (SeqOutput((10, 11, 13), 2, False), SeqOutput((10, STOP), 3, True))
    sched.update(verify, outputs)
    assert a.token_ids == [5, 6, 7, 9, 10, 11, 13] and a.num_computed == 6  # 7 - 1 rejected
    assert b.status is Status.FINISHED and b.token_ids[-1] == STOP
    assert (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) == (2, 6, 5)


def test_a_sequence_finished_after_launch_is_dropped():
    sched, proc = scheduler(), OutputProcessor(Letters())
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=3))
    proc.add("r", 0, seq.params)
    sched.add(seq)
    plan = sched.schedule()
    sched.finish(seq)  # aborted while its step ran
    proc.drop("r")
    outputs = proc.process(plan, result([8]))
    assert outputs == StepOutputs([], (None,))
    sched.update(plan, outputs)
    assert seq.token_ids == [5, 6, 7]


# ---- the engine's loop -----------------------------------------------------------------------


def test_the_engine_launches_a_step_before_reading_the_previous_one(tiny_checkpoints, monkeypatch):
    from mistral_jax import LLM

    llm = LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=64, progress=False)
    engine = llm.engine
    calls = []
    for stage in ("launch", "collect"):
        real = getattr(engine.runner, stage)
        monkeypatch.setattr(engine.runner, stage,
                            lambda *a, _real=real, _stage=stage, **k: (calls.append(_stage), _real(*a, **k))[1])
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == [] and calls == ["launch"]  # nothing read yet: the step runs
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [e.token_id for e in engine.step()]
    assert calls[:5] == ["launch", "launch", "collect", "launch", "collect"]  # i+1 launched before i is read
    assert len(tokens) == 3 and not engine.sequences and not engine.outputs
