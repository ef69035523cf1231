"""Property test of the scheduler with the page allocator, without a model: random arrivals,
aborts and lengths on a small cache (so preemption and prefix sharing happen). After every step
no page is leaked or owned twice (except prefix pages shared through the cache), budgets hold,
and at the end every page is free."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_jax.cache.page_allocator import NULL_PAGE, PageAllocator
from mistral_jax.engine.plan import SeqOutput, StepOutputs
from mistral_jax.engine.scheduler import Scheduler, Sequence, Status
from mistral_jax.sample.sampling import SamplingParams

PAGE = 4
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 11, 12, 13, 14], [21, 22, 23, 24, 25]]

arrival = st.tuples(st.just("add"), st.integers(0, len(BASES) - 1), st.lists(st.integers(30, 40), max_size=12),
                    st.integers(1, 10))
abort = st.tuples(st.just("abort"), st.integers(0, 1000))
step = st.tuples(st.just("step"))
ops_strategy = st.lists(st.one_of(arrival, abort, step, step, step), min_size=1, max_size=60)


class Driver:
    """The engine's host loop with a fake device: one step in flight, its tokens read after the
    next step is launched (as mistral_jax.engine.engine does); the scheduler's three entry points
    (schedule, launched, update) are the only writers of the sequences' state."""

    def __init__(self, num_pages, max_num_seqs, budget, caching):
        self.alloc = PageAllocator(num_pages, PAGE, caching)
        self.sched = Scheduler(self.alloc, max_num_seqs, budget)
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.live: list[Sequence] = []
        self.pending = None
        self.n = 0
        self.finished = 0

    def add(self, base, suffix, max_tokens):
        prompt = BASES[base] + suffix
        max_tokens = min(max_tokens, (self.alloc.num_pages - 1) * PAGE - len(prompt))  # check_request's rule
        seq = Sequence(str(self.n), prompt, SamplingParams(max_tokens=max_tokens))
        self.n += 1
        self.live.append(seq)
        self.sched.add(seq)

    def abort(self, k):
        if self.live:
            seq = self.live.pop(k % len(self.live))
            self.sched.finish(seq)

    def step(self):
        plan = self.sched.schedule()
        assert plan.num_tokens <= self.budget
        assert len(self.sched.running) <= self.max_num_seqs
        assert len({id(s.seq) for s in plan}) == len(plan)
        for s in plan:  # a scheduled sequence keeps pages for every token it computes
            assert s.seq.status is Status.RUNNING and len(s.seq.pages) * PAGE >= s.start + s.n
        self.sched.launched(plan)
        if self.pending:
            self.sched.update(self.pending, self.read(self.pending))
        self.pending = plan or None
        return bool(plan)

    def read(self, plan):
        """The output processor's verdict on a fake step: one token per sampled sequence, the
        request done at max_tokens."""
        seqs = []
        for s in plan:
            seq = s.seq
            if not s.sample or seq.status is Status.FINISHED:
                seqs.append(None)
                continue
            done = seq.num_generated - seq.in_flight + 1 >= seq.params.max_tokens
            seqs.append(SeqOutput((100 + len(seq.token_ids) % 7,), finished=done))
            if done:
                self.live.remove(seq)
                self.finished += 1
        return StepOutputs([], tuple(seqs))

    def check(self):
        owners: dict[int, list[Sequence]] = {}
        for seq in self.sched.waiting:
            assert seq.pages == [] and seq.num_computed == 0
        for seq in self.sched.running:
            assert NULL_PAGE not in seq.pages and len(set(seq.pages)) == len(seq.pages)
            assert len(seq.pages) * PAGE >= seq.num_computed
            assert seq.num_computed <= seq.num_tokens
            for i, p in enumerate(seq.pages):
                owners.setdefault(p, []).append((seq, i))
        for _page, who in owners.items():
            if len(who) > 1:  # only a cached prefix page may be shared, at the same position
                assert len({i for _, i in who}) == 1
                assert all(i < seq.num_registered for seq, i in who), "a private page is owned twice"
        assert self.alloc.num_used_pages == len(owners), "a page is leaked"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, num_pages=st.integers(14, 40), max_num_seqs=st.integers(1, 6),
       budget=st.integers(1, 24), caching=st.booleans())
def test_random_arrivals_aborts_and_lengths_leak_nothing(ops, num_pages, max_num_seqs, budget, caching):
    d = Driver(num_pages, max_num_seqs, budget, caching)
    for op in ops:
        if op[0] == "add":
            d.add(op[1], op[2], op[3])
        elif op[0] == "abort":
            d.abort(op[1])
        else:
            d.step()
        d.check()
    for _ in range(5000):  # drain: everything left must finish
        if not d.sched.has_work() and d.pending is None:
            break
        d.step()
        d.check()
    assert not d.sched.has_work() and d.live == []
    assert d.alloc.num_used_pages == 0
    assert d.alloc.num_free_pages == num_pages - 1


def test_driver_sees_preemption_and_prefix_hits():
    """The property test's setting really exercises preemption and sharing."""
    d = Driver(num_pages=14, max_num_seqs=6, budget=24, caching=True)
    for i in range(12):
        d.add(i % 2, list(range(30, 30 + i)), 10)
    while d.sched.has_work() or d.pending is not None:
        d.step()
        d.check()
    assert d.sched.num_preemptions > 0
    assert d.alloc.stats.cached_tokens > 0
    assert d.finished == 12 and d.alloc.num_used_pages == 0
