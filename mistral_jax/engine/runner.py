"""The model runner: a StepPlan onto the device and its tokens back, and everything that lives
on the device between steps (the KV pages, the penalty state, the last sampled tokens).

    launch(plan, after) -> Launched     fill drafts, pack, place, run the step's programs
    collect(launched) -> StepResult     read its results to the host (waits for the device)

The two halves are apart so that the engine can stay one step ahead of the device: it launches
step i+1 before it collects step i, and a decode token of step i that the host has not read yet
is fed to step i+1 on the device (`prev_index`, packing.py). The runner holds the program set
(buckets.py, step_programs.py), compiles it up front in `warmup()`, and owns the placement of
every array it hands to a program.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mistral_jax.cache.paged import init_pages
from mistral_jax.engine.buckets import Buckets
from mistral_jax.engine.draft import DraftModel
from mistral_jax.engine.packing import PackedStep, pack
from mistral_jax.engine.placement import Placement
from mistral_jax.engine.plan import StepPlan, StepResult
from mistral_jax.engine.programs import Program
from mistral_jax.engine.sequence import Sequence
from mistral_jax.engine.speculative import UNFILLED
from mistral_jax.engine.step_inputs import StepWire, empty_inputs, no_bias, to_wire
from mistral_jax.engine.step_programs import _prompt_logprobs_step, _reset_penalty_row, _step, _top_logprobs
from mistral_jax.model.transformer import Transformer
from mistral_jax.runtime.sharding import use_mesh
from mistral_jax.sample.sampling import SamplingArrays
from mistral_jax.sample.structured import MaskBuffer, Matcher


@dataclasses.dataclass(frozen=True)
class Launched:
    """A step on its way: its plan (drafts filled in) and its results, still on the device."""

    plan: StepPlan
    result: object  # device SampleResult over [S] rows
    top: object  # device (top logprobs [S, n], their ids [S, n]), or None
    prompt: object  # device prompt logprobs (step_programs._prompt_logprobs), or None
    row_of: dict[Sequence, int]  # each sequence's first sampling row (where its token lands)


class ModelRunner:
    def __init__(self, model: Transformer, draft: DraftModel | None, mesh: Mesh, buckets: Buckets, *,
                 num_pages: int, page_size: int, max_num_seqs: int, attention_impl: str):
        self.graphdef, self.state = nnx.split(model)
        self.cfg, self.dtype = model.cfg, model.dtype
        self.draft = draft
        self.mesh = mesh
        self.placement = Placement(mesh)
        self.buckets = buckets
        self.num_pages, self.page_size, self.max_num_seqs = num_pages, page_size, max_num_seqs
        self.attention_impl = attention_impl
        self.allocate()
        # Grammar bitmasks (structured outputs): built on the host for steps with constrained
        # rows; other steps take one resident all-ones mask per sequence bucket.
        self.masks = MaskBuffer(buckets.max_seqs, self.cfg.vocab_size)
        self._all_allowed: dict[int, jax.Array] = {}
        # Logit bias (step_inputs.py): a resident all-padding array per sequence bucket for steps
        # where no row has a bias, and the last biased step's array (host copy, device copy),
        # reused while the rows' biases stay the same.
        self._no_bias: dict[int, jax.Array] = {}
        self._last_bias: tuple[np.ndarray, jax.Array] | None = None
        # The compiled programs, by bucket; kept on disk across restarts (programs.py).
        devices = list(mesh.devices.flat)
        self.step_program = Program(_step, devices, graphdef=self.graphdef, impl=attention_impl,
                                    max_seqs=buckets.max_seqs)
        self.prompt_lp_program = Program(_prompt_logprobs_step, devices, graphdef=self.graphdef)
        self.top_lp_program = Program(_top_logprobs, devices)
        self.reset_row_program = Program(_reset_penalty_row, devices)

    # ---- device state ---------------------------------------------------------------------

    def allocate(self) -> None:
        """The buffers the step programs update (donated, replaced by each step's outputs), all
        zero: the KV pages (the draft model's too), the penalty state, the last sampled tokens."""
        with use_mesh(self.mesh):
            # Placed as the step returns them (so the second step does not compile again),
            # straight into their sharding (a device_put afterwards could copy gigabytes).
            self.k_pages, self.v_pages = init_pages(self.cfg, self.num_pages, self.page_size, self.dtype, self.mesh)
        if self.draft is not None:  # the same page numbers: a page holds both models' k/v
            self.draft.allocate(self.mesh, self.num_pages, self.page_size, self.attention_impl)
        # Penalty state [max_num_seqs, vocab]: generated-token counts and seen tokens per slot.
        penalty_shape = (self.max_num_seqs, self.cfg.vocab_size)
        self.counts = self.placement.replicated(np.zeros(penalty_shape, np.int32))
        self.seen = self.placement.replicated(np.zeros(penalty_shape, bool))
        self.prev_tokens = self.placement.replicated(np.zeros((self.buckets.max_seqs,), np.int32))

    def recover(self) -> bool:
        """After a step raised: a program that failed on the device may have consumed the buffers
        donated to it (deleted) without returning new ones. Then every buffer is replaced by a
        fresh one (the old ones freed first: never two caches at once). True if it was; the KV
        cache's content is gone then."""
        buffers = [self.k_pages, self.v_pages, self.counts, self.seen, self.prev_tokens]
        if self.draft is not None:
            buffers += [self.draft.k_pages, self.draft.v_pages]
        if not any(x.is_deleted() for x in buffers):
            return False
        for x in buffers:
            if not x.is_deleted():
                x.delete()
        self.allocate()
        return True

    # ---- one step -------------------------------------------------------------------------

    def launch(self, plan: StepPlan, after: Launched | None) -> Launched:
        """Run the plan's step, not waiting for it. after: the previous step, if it is unread
        (its sampled tokens feed this one's decode tokens on the device)."""
        with use_mesh(self.mesh):
            if self.draft is not None:
                plan = self._fill_drafts(plan)
        row_of = after.row_of if after is not None else {}
        packed = self._pack(plan, row_of)
        S = packed.num_rows
        wire = self._place(to_wire(packed.inputs, SamplingArrays.from_params(packed.params, pad_to=S)))
        allowed = self._allowed(S, packed.constrained)
        with use_mesh(self.mesh):
            if self.draft is not None:  # the draft's cache follows the target's, step by step
                self.draft.step(wire, self.prev_tokens)
            self._reset_penalties(plan)
            result, hidden, logits = self._run_step(wire, allowed)
            top = self.top_lp_program(len(logits), logits) if plan.wants_top_logprobs else None
            prompt = (self.prompt_lp_program(wire.num_tokens, self.state, hidden, wire)
                      if plan.wants_prompt_logprobs else None)
        return Launched(plan, result, top, prompt, dict(zip((s.seq for s in plan), plan.first_rows)))

    def collect(self, launched: Launched) -> StepResult:
        """Bring a step's results to the host (waits for the device)."""
        host = self.placement.to_host(launched.result)
        top = self.placement.to_host(launched.top) if launched.top is not None else None
        prompt = self.placement.to_host(launched.prompt) if launched.prompt is not None else None
        return StepResult(host.tokens, host.logprob, top, prompt)

    def _pack(self, plan: StepPlan, prev_rows: dict[Sequence, int]) -> PackedStep:
        return pack(plan, prev_rows, self.buckets, self.page_size, no_slot=self.max_num_seqs)

    def _run_step(self, wire: StepWire, allowed):
        """One step's program (its bucket: the token count), keeping the state it updates."""
        (result, hidden, logits, self.prev_tokens, self.k_pages, self.v_pages, self.counts,
         self.seen) = self.step_program(wire.num_tokens, self.state, self.k_pages, self.v_pages, wire, allowed,
                                        self.prev_tokens, self.counts, self.seen)
        return result, hidden, logits

    def _place(self, host: StepWire) -> StepWire:
        """A step's wire for its programs: two transfers for all of its host arrays, and the
        logit bias array (_bias)."""
        bias = self._bias(len(host.per_seq), host.bias)
        return self.placement.to_mesh(host.replace(bias=None)).replace(bias=bias)

    def _bias(self, S: int, host: np.ndarray | None) -> jax.Array:
        """The step's logit bias [S, BIAS_COLUMNS] on the device: the resident all-padding one
        when no row has a bias (no transfer); else the step's own, placed as the resident one is
        (another placement is another program), or the previous step's when it is the same."""
        if host is None:
            if S not in self._no_bias:
                self._no_bias[S] = self.placement.replicated(no_bias(S))
            return self._no_bias[S]
        last = self._last_bias
        if last is None or last[0].shape != host.shape or not np.array_equal(last[0], host):
            last = self._last_bias = (host, self.placement.replicated(host))
        return last[1]

    def _allowed(self, S: int, constrained: list[tuple[int, Matcher]]) -> jax.Array:
        """The step's grammar bitmask [S, vocab / 32]: all ones unless some row is constrained."""
        if constrained:  # placed as the resident one is (another placement is another program)
            return self.placement.replicated(self.masks.build(S, constrained))
        if S not in self._all_allowed:
            self._all_allowed[S] = self.placement.replicated(self.masks.all_ones[:S])
        return self._all_allowed[S]

    def _reset_penalties(self, plan: StepPlan) -> None:
        """A request that uses penalties starts from its own tokens in its slot's row (rows of
        other requests may hold anything: neutral penalties ignore them)."""
        for s in plan:
            seq = s.seq
            if seq.uses_penalties and s.admitted:
                row = self._penalty_row(seq.slot, seq.token_ids, len(seq.prompt_ids))
                self.counts, self.seen = self.reset_row_program(None, self.counts, self.seen, *row)

    def _penalty_row(self, slot: int, token_ids: list[int], num_prompt: int):
        ids = np.full(self.buckets.penalty_ids, self.cfg.vocab_size, np.int32)  # [penalty_ids]
        ids[: len(token_ids)] = token_ids
        return self.placement.to_mesh((np.int32(slot), ids, np.int32(num_prompt)))

    def _fill_drafts(self, plan: StepPlan) -> StepPlan:
        """The draft model's tokens for the sequences the scheduler gave room for drafts: k greedy
        steps from each one's last token, in one program, read back once."""
        want = [i for i, s in enumerate(plan) if s.draft and s.draft[0] == UNFILLED]
        if not want:
            return plan
        R = self.buckets.draft_rows(len(want))
        first = np.zeros(R, np.int32)  # [R] each row's last token
        positions = np.full((self.draft.k, R), -1, np.int32)  # [k, R]
        slots = np.full((self.draft.k, R), -1, np.int32)  # [k, R]
        pages = np.zeros((R, self.buckets.page_table_width), np.int32)
        for r, i in enumerate(want):
            seq, n = plan[i].seq, len(plan[i].draft)
            first[r] = seq.token_ids[-1]  # known: a sequence with drafts is never in flight
            pos = len(seq.token_ids) - 1 + np.arange(n)
            page_of = np.asarray(seq.pages, np.int32)
            positions[:n, r] = pos
            slots[:n, r] = page_of[pos // self.page_size] * self.page_size + pos % self.page_size
            pages[r, : len(seq.pages)] = seq.pages
        drafts = self.placement.to_host(self.draft.propose(first, positions, slots, pages, len(want),
                                                           self.placement.to_mesh))
        return plan.with_drafts({i: tuple(int(t) for t in drafts[: len(plan[i].draft), r])
                                 for r, i in enumerate(want)})

    # ---- the program set ------------------------------------------------------------------

    def programs(self) -> int:
        """Programs a warm runner has compiled: a step and a prompt-logprobs program per token
        bucket, a top-logprobs program per sequence bucket, and the penalty-row reset; with a
        draft model, its step per token bucket and its proposal program per row bucket."""
        b = self.buckets
        n = 2 * len(b.tokens) + len(b.seqs_buckets()) + 1
        if self.draft is not None:
            n += len(b.tokens) + len(b.draft_row_buckets())
        return n

    def programs_held(self) -> int:
        """Executables the runner's programs hold now (compiled or loaded)."""
        owners = [self] + ([self.draft] if self.draft is not None else [])
        return sum(len(p._by_bucket) for owner in owners for p in vars(owner).values() if isinstance(p, Program))

    def warmup(self) -> tuple[int, float]:
        """Compile (or load from the persistent cache) every program a request can need, by running
        each once on an empty batch (no sequence: no page is written, no token kept). Returns
        (programs, seconds)."""
        t0 = time.perf_counter()
        top_lp_warm = set()
        with use_mesh(self.mesh):
            for T in self.buckets.tokens:
                S = self.buckets.seqs(T)
                wire = self._place(to_wire(empty_inputs(T, S, self.buckets.page_table_width, self.max_num_seqs),
                                           SamplingArrays.from_params([], pad_to=S)))
                if self.draft is not None:
                    self.draft.step(wire, self.prev_tokens)
                result, hidden, logits = self._run_step(wire, self._allowed(S, []))
                jax.block_until_ready(self.prompt_lp_program(T, self.state, hidden, wire))
                if logits.shape[0] not in top_lp_warm:  # one per sequence bucket
                    top_lp_warm.add(logits.shape[0])
                    jax.block_until_ready(self.top_lp_program(logits.shape[0], logits))
            self.counts, self.seen = self.reset_row_program(None, self.counts, self.seen, *self._penalty_row(0, [], 0))
            for R in self.buckets.draft_row_buckets() if self.draft is not None else ():
                k = self.draft.k  # no row: every slot -1, nothing written
                jax.block_until_ready(self.draft.propose(
                    np.zeros(R, np.int32), np.full((k, R), -1, np.int32), np.full((k, R), -1, np.int32),
                    np.zeros((R, self.buckets.page_table_width), np.int32), 0, self.placement.to_mesh))
            jax.block_until_ready((result, self.counts))
        return self.programs(), time.perf_counter() - t0
