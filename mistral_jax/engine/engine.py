"""The serving engine: continuous batching over a paged KV cache, one jitted step for any mix.

Each step packs the scheduled tokens of every sequence (prefill chunks and single decode
tokens alike) into one row, runs the model once over the paged cache and samples one token per
sequence.

Compiled programs form a small, known set (`Engine.programs`), compiled up front by `warmup()`
so that no request waits on a compile, whatever it hits in the prefix cache:
- one step program per token bucket (powers of two up to max_num_batched_tokens); its sequence
  axis is tied to the token bucket (a step of T tokens holds at most T sequences), and every
  step takes one full-width block table (attention reads only as far as each kv_len);
- per-request settings are arrays, not program variants: sampling values, penalties (always
  applied; neutral values change nothing), the chosen token's logprob (always computed);
- the top MAX_LOGPROBS logprobs run in a small program per sequence bucket, over the step's
  logits, only on steps where some request asks for them (in the step they cost a sort of the
  vocabulary every step: an H200's FP8 decode step at 64 rows, 0.36 ms of ~9.7);
- prompt logprobs run in a second, small program per token bucket, over the step's hidden
  states (the head and a log-softmax), only on steps that need them;
- one program resets a request's penalty row.

The host stays one step ahead of the device: it launches step i+1 before reading step i's
tokens. A decode token that is still on the device is fed from step i's output
(`prev_index`), so the device never waits for the host's bookkeeping.

Speculative decoding (speculative.py, draft.py): a decoding sequence's proposed tokens ride in
the same step after its last token, each with its own sampling row, so a step's sampling axis
counts rows, not sequences; the host keeps the proposals the model sampled too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.ragged_paged_attention import default_impl

from mistral_jax.engine.draft import DraftModel
from mistral_jax.model.transformer import Transformer
from mistral_jax.engine.outputs import OutputState, StepEvent
from mistral_jax.cache.page_allocator import PageAllocator
from mistral_jax.cache.paged import PAGE_AXES, PagedKVCache, init_pages, page_bytes
from mistral_jax.engine.programs import Program
from mistral_jax.engine.request_limits import RequestLimits
from mistral_jax.sample.sampling import MAX_LOGPROBS, SamplingArrays, SamplingParams, sample, top_k_over_vocab
from mistral_jax.engine.scheduler import Scheduled, Scheduler, Sequence, Status
from mistral_jax.runtime.sharding import constrain, mesh_size, use_mesh
from mistral_jax.engine.speculative import UNFILLED, SpeculativeConfig, Speculator, SpecState
from mistral_jax.engine.step_inputs import StepInputs, StepWire, empty_inputs, from_wire, to_wire
from mistral_jax.sample.structured import Matcher, MaskBuffer
from mistral_jax.tokenizer.tokenizer import Tokenizer

# Small batches share one program: on an accelerator a padded row costs next to nothing (decode
# streams the weights either way). A CPU is compute-bound, so there a batch-1 decode step runs
# one token, not 16 (16 padded rows made the default model's decode 1.6x slower).
MIN_TOKEN_BUCKET = 16
MIN_TOKEN_BUCKET_CPU = 1
# ... except one sequence's decode, the latency-critical step: on an accelerator a step of one
# token has its own program too (no empty prefill-attention launch, products of one row). H200,
# Mistral-Small-2501, batch 1: 12.72 against 12.81 ms a step in bf16, 7.91 against 8.13 in FP8.
ONE_TOKEN_PROGRAM = True
# A step's sequence axis (sampling rows, the head's rows) starts at 8 on an accelerator, where a
# padded row costs next to nothing, and at 1 on a CPU, where each row costs its share of the
# head (49k x 576 for the default model) and of the attention: the default model's batch-1 step
# ran 38-39 ms with one row against 52-64 ms with 8 (2-core CPU, JAX 0.10.2).
MIN_SEQS_BUCKET = 8
MIN_SEQS_BUCKET_CPU = 1
MIN_PAGES_BUCKET = 4
CPU_CACHE_BYTES = 1 << 30  # KV cache on a CPU host when neither num_pages nor a device limit says


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Round n up to a power of two (at least `minimum`), capped at `maximum`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum) if maximum is not None else b


@dataclasses.dataclass
class EngineConfig:
    """Serving settings (vLLM's names where vLLM has one)."""

    max_model_len: int
    block_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # explicit page count (overrides gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9  # fraction of device memory the engine may use
    max_num_seqs: int = 256  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decode tokens)
    enable_prefix_caching: bool = True
    attention_impl: str = "auto"  # "auto" | "reference" | "triton" | "tpu"
    speculative_config: SpeculativeConfig | dict | str | None = None  # speculative.py
    # vLLM's seed: the draws of requests that set no seed come from one generator started here,
    # so a run repeats itself (the same requests in the same order); None: a fresh one each run.
    seed: int | None = 0

    def __post_init__(self):
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        checks = [
            ("block_size", self.block_size, 1 <= self.block_size <= 1024, "an integer in [1, 1024], e.g. 16"),
            ("max_num_seqs", self.max_num_seqs, self.max_num_seqs >= 1, "an integer >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens, self.max_num_batched_tokens >= 1,
             "an integer >= 1 (e.g. 2048)"),
            ("gpu_memory_utilization", self.gpu_memory_utilization, 0 < self.gpu_memory_utilization <= 1,
             "a fraction in (0, 1], e.g. 0.9"),
            ("num_pages", self.num_pages, self.num_pages is None or self.num_pages >= 2,
             "None (size from memory) or an integer >= 2"),
            ("seed", self.seed, self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             "None (fresh each run) or an integer >= 0"),
        ]
        for name, value, ok, fix in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: use {fix}")


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "max_seqs"),
                   donate_argnames=("k_pages", "v_pages", "counts", "seen"))
def _step(state, k_pages, v_pages, wire: StepWire, allowed, prev_tokens, counts, seen, *,
          graphdef, impl: str, max_seqs: int):
    model: Transformer = nnx.merge(graphdef, state)
    inputs, sampling = from_wire(wire, allowed)
    prev = prev_tokens[jnp.maximum(inputs.prev_index, 0)]
    tokens = jnp.where(inputs.prev_index >= 0, prev, inputs.tokens)[None]  # [1, T]
    cache = PagedKVCache(k_pages, v_pages, inputs.slot_mapping, inputs.kv_lens, inputs.page_indices,
                         inputs.cu_q_lens, inputs.num_seqs, impl=impl)
    hidden, cache = model.hidden(tokens, inputs.positions[None], cache)  # [1, T, dim]
    last = model.logits(hidden[:, inputs.logits_at])[0]  # [S, vocab]: each sampling row
    vocab = last.shape[-1]
    # Every row's penalties apply (neutral values leave its logits as they are), so requests with
    # and without penalties share one program.
    result = sample(last, sampling, inputs.step, counts[inputs.slots], seen[inputs.slots])
    kept = jnp.where(inputs.sampled, result.tokens, vocab)  # record kept tokens; padding rows drop
    counts = counts.at[inputs.slots, kept].add(1, mode="drop")
    seen = seen.at[inputs.slots, kept].set(True, mode="drop")
    # A fixed-size copy of the sampled tokens feeds the next step, whatever its bucket.
    next_tokens = jnp.zeros((max_seqs,), jnp.int32).at[: result.tokens.shape[0]].set(result.tokens)
    k_pages, v_pages = constrain(cache.k, PAGE_AXES), constrain(cache.v, PAGE_AXES)  # keep their placement
    return result, hidden[0], last, next_tokens, k_pages, v_pages, counts, seen


@jax.jit
def _top_logprobs(logits):
    """A step's logits [S, vocab] -> the top MAX_LOGPROBS of each row's raw log-softmax:
    (logprobs [S, n] f32, ids [S, n] i32). Only for steps whose requests ask for them."""
    return top_k_over_vocab(jax.nn.log_softmax(logits, axis=-1), MAX_LOGPROBS)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_logprobs_step(state, hidden, wire: StepWire, *, graphdef):
    """A step's hidden states [T, dim] -> prompt logprobs (see _prompt_logprobs): the head and a
    log-softmax over every row, only for steps that carry a request asking for them."""
    logits = nnx.merge(graphdef, state).logits(hidden[None])[0]  # [T, vocab]
    return _prompt_logprobs(logits, wire.next_ids, MAX_LOGPROBS)


def _prompt_logprobs(logits, next_ids, n: int):
    """logits [T, vocab] -> log p(next prompt token) [T] and the top-n [T, n] at each row."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    actual = jnp.take_along_axis(lp, jnp.maximum(next_ids, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = top_k_over_vocab(lp, n)
    return actual, top_ids, top_lp


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _reset_penalty_row(counts, seen, slot, ids, num_prompt):
    """Row `slot` of the penalty state from a sequence's tokens. ids: [max_model_len bucket]
    padded with vocab (one shape: one program)."""
    vocab = counts.shape[1]
    generated = jnp.arange(ids.shape[0]) >= num_prompt
    row_seen = jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop")
    row_counts = jnp.zeros((vocab,), jnp.int32).at[jnp.where(generated, ids, vocab)].add(1, mode="drop")
    return counts.at[slot].set(row_counts), seen.at[slot].set(row_seen)


def _shared_seed() -> int:
    """Process 0's random seed, on every process (multi-process runs)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.random.default_rng().integers(2**31, dtype=np.int32)))


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def powers_of_two(lo: int, hi: int) -> list[int]:
    """The buckets bucket() rounds to between lo and hi (both included; hi need not be a power)."""
    out = [lo]
    while out[-1] < hi:
        out.append(min(out[-1] * 2, hi))
    return out


@dataclasses.dataclass
class _Launched:
    batch: list[Scheduled]
    result: object  # device SampleResult
    top_lp: object  # device (top logprobs [S, n], their ids [S, n]) or None
    prompt_lp: object  # device prompt logprobs or None
    rows: list[int]  # each scheduled sequence's first sampling row


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, mesh: Mesh, config: EngineConfig,
                 draft: Transformer | None = None):
        """draft: the draft model of speculative_config's draft_model method, loaded."""
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.dtype = model.dtype
        self.tokenizer = tokenizer
        self.mesh = mesh
        # Several processes (multi-host): each runs this same engine; step inputs are built on every
        # host alike and placed replicated; only the local devices are touched from here.
        self.multiprocess = jax.process_count() > 1
        self.local_device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
        self.config = config
        self.max_model_len = config.max_model_len
        self.page_size = config.block_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        # One full-width block table for every step: the kernels and the reference read only as
        # far as each kv_len, so its width costs nothing and adds no program.
        self.page_table_width = bucket(self.max_pages_per_seq, MIN_PAGES_BUCKET)
        on_cpu = mesh.devices.flat[0].platform == "cpu"
        self.min_seqs_bucket = MIN_SEQS_BUCKET_CPU if on_cpu else MIN_SEQS_BUCKET
        self.max_seqs_bucket = bucket(config.max_num_seqs, self.min_seqs_bucket)
        self.min_token_bucket = MIN_TOKEN_BUCKET_CPU if on_cpu else MIN_TOKEN_BUCKET
        self._token_buckets = powers_of_two(self.min_token_bucket,
                                            bucket(config.max_num_batched_tokens, self.min_token_bucket))
        if ONE_TOKEN_PROGRAM and self._token_buckets[0] > 1:
            self._token_buckets.insert(0, 1)
        self.attention_impl = config.attention_impl
        if self.attention_impl == "auto":
            self.attention_impl = default_impl(mesh.devices.flat[0].platform)
        spec = config.speculative_config
        if (draft is not None) != (spec is not None and spec.method == "draft_model"):
            raise ValueError("a draft model goes with speculative_config's draft_model method, and only with it")
        self.draft = DraftModel(draft, self.cfg, spec.num_speculative_tokens) if draft is not None else None
        self.num_pages = self._size_cache()
        self.allocator = PageAllocator(self.num_pages, self.page_size, config.enable_prefix_caching)
        self.limits = RequestLimits(self.cfg.vocab_size, self.max_model_len, self.page_size, self.num_pages)
        self.speculator = Speculator(spec) if spec is not None else None
        # A step's sampling rows (sequences + drafts) fit its sequence axis: rows <= tokens <= T
        # and rows <= max_seqs_bucket, so seqs_bucket(T) holds them; drafts add no program.
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   speculator=self.speculator, max_rows=self.max_seqs_bucket)
        self._allocate_device_state()
        # Grammar bitmasks (structured outputs): built on the host for steps with constrained
        # rows; other steps take one resident all-ones mask per sequence bucket.
        self.masks = MaskBuffer(self.max_seqs_bucket, self.cfg.vocab_size)
        self._all_allowed: dict[int, jax.Array] = {}
        self.sequences: dict[str, Sequence] = {}
        self.outputs: dict[str, OutputState] = {}
        self._prompt_lps: dict[str, dict[int, dict[int, float]]] = {}
        self._pending: _Launched | None = None
        self._rows: dict[Sequence, int] = {}  # the pending step's row of each sequence
        self._ids = itertools.count()
        # Default seeds must agree across processes, or their replicated inputs would differ.
        self._rng = np.random.default_rng(config.seed if config.seed is not None
                                          else _shared_seed() if self.multiprocess else None)
        # The compiled programs, by bucket; kept on disk across restarts (programs.py).
        devices = list(mesh.devices.flat)
        self._step_program = Program(_step, devices, graphdef=self.graphdef, impl=self.attention_impl,
                                     max_seqs=self.max_seqs_bucket)
        self._prompt_lp_program = Program(_prompt_logprobs_step, devices, graphdef=self.graphdef)
        self._top_lp_program = Program(_top_logprobs, devices)
        self._reset_row_program = Program(_reset_penalty_row, devices)

    def _allocate_device_state(self) -> None:
        """The buffers the step programs update (donated, replaced by each step's outputs), all
        zero: the KV pages (the draft model's too), the penalty state, the last sampled tokens."""
        with use_mesh(self.mesh):
            # Placed as the step returns them (so the second step does not compile again),
            # straight into their sharding (a device_put afterwards could copy gigabytes).
            self.k_pages, self.v_pages = init_pages(self.cfg, self.num_pages, self.page_size, self.dtype, self.mesh)
        if self.draft is not None:  # the same page numbers: a page holds both models' k/v
            self.draft.allocate(self.mesh, self.num_pages, self.page_size, self.attention_impl)
        # Penalty state [max_num_seqs, vocab]: generated-token counts and seen tokens per slot.
        penalty_shape = (self.config.max_num_seqs, self.cfg.vocab_size)
        self.counts = self._replicated(np.zeros(penalty_shape, np.int32))
        self.seen = self._replicated(np.zeros(penalty_shape, bool))
        self.prev_tokens = self._replicated(np.zeros((self.max_seqs_bucket,), np.int32))

    # ---- sizing and validation ------------------------------------------------------------

    def device_memory(self) -> dict | None:
        """The first device's allocator statistics (bytes_limit, bytes_in_use); None on CPU."""
        stats = self.local_device.memory_stats()
        return stats if stats and "bytes_limit" in stats else None

    def _activation_bytes(self) -> int:
        """A generous bound on one step's temporaries (activations, logits, sampling), and the
        logits each step returns (for _top_logprobs), held until it is read: two steps' worth."""
        c, t, s = self.cfg, self.config.max_num_batched_tokens, self.config.max_num_seqs
        per_token = (8 * c.dim + 3 * c.hidden_dim + 4 * c.n_heads * c.head_dim) * 4
        return t * per_token + (6 + 2) * s * c.vocab_size * 4 + (256 << 20)

    def _size_cache(self) -> int:
        per_page = page_bytes(self.cfg, self.page_size, self.dtype)
        if self.draft is not None:
            per_page += self.draft.page_bytes(self.page_size)
        if self.config.num_pages is not None:
            return self.config.num_pages
        stats = self.device_memory()
        if stats is None:  # CPU: enough for max_num_seqs full sequences, within a fixed budget
            want = self.config.max_num_seqs * self.max_pages_per_seq + 1
            return max(2, min(want, CPU_CACHE_BYTES // per_page))
        budget = (self.config.gpu_memory_utilization * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                  - self._activation_bytes())
        # The budget is one device's; each device holds its 1/tp of every page's kv heads.
        pages = int(budget // (per_page / mesh_size(self.mesh, "tp")))
        if pages < 2:
            raise ValueError(
                f"no room for a KV cache: gpu_memory_utilization={self.config.gpu_memory_utilization} of "
                f"{stats['bytes_limit'] / 2**30:.1f} GiB leaves {budget / 2**30:.2f} GiB after the weights "
                f"({stats.get('bytes_in_use', 0) / 2**30:.1f} GiB) and step buffers: raise "
                "gpu_memory_utilization, lower max_num_batched_tokens / max_num_seqs, or use a smaller dtype")
        return pages

    def describe_cache(self) -> str:
        gib = self.num_pages * page_bytes(self.cfg, self.page_size, self.dtype) / 2**30 / mesh_size(self.mesh, "tp")
        return (f"KV cache: {self.num_pages} pages of {self.page_size} tokens = "
                f"{(self.num_pages - 1) * self.page_size:,} tokens, {gib:.2f} GiB per device on "
                f"{self.mesh.devices.size} x {self.mesh.devices.flat[0].device_kind}; attention "
                f"{self.attention_impl}; prefix cache {'on' if self.config.enable_prefix_caching else 'off'}")

    def check_request(self, ids: list[int], params: SamplingParams, where: str) -> SamplingParams:
        """Reject bad input before any work starts, with a ValueError naming the fix (anything
        the step could not pack included: RequestLimits.check); returns the checked params the
        engine runs (max_tokens=None filled up to the context, seed=None drawn)."""
        return self.limits.check(ids, params, where, self._rng)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, index: int = 0,
                    request_id: str | None = None, matcher: Matcher | None = None) -> str:
        """matcher: the request's compiled grammar, when the caller built it off this thread
        (a complex grammar takes 0.1-1 s to build); else built here from params.structured_outputs.
        A request is checked (check_request) before the scheduler sees it: nothing it carries
        can fail inside a later step."""
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.sequences:
            raise ValueError(f"request_id {request_id!r} is already running: use a new id")
        params = self.check_request(list(prompt_ids), params, f"prompt {index}")
        if matcher is None and params.structured_outputs is not None:
            matcher = self.matcher(params)
        seq = Sequence(request_id, [int(t) for t in prompt_ids], params, index, matcher=matcher)
        if self.speculator is not None and matcher is None and not _uses_penalties(params):
            # Drafts are sampled with the penalty counts and grammar state of the step's start, which
            # would be wrong past the first draft: such requests decode plainly.
            seq.spec = SpecState()
        self.sequences[request_id] = seq
        self.outputs[request_id] = OutputState(request_id, index, params, self.tokenizer)
        self.scheduler.add(seq)
        return request_id

    def matcher(self, params: SamplingParams) -> Matcher:
        """A request's grammar state (ValueError naming the problem for an invalid constraint)."""
        return Matcher(params.structured_outputs, self.tokenizer, self.cfg.vocab_size)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its pages; False if it is unknown or already done."""
        seq = self.sequences.pop(str(request_id), None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        self.outputs.pop(seq.request_id, None)
        self._prompt_lps.pop(seq.request_id, None)
        return True

    def abort_all(self) -> list[str]:
        """Drop every request and the step in flight; returns the ids of the requests dropped.

        The recovery after step() raised midway (LLM and the server's engine process call it,
        then go on serving): by then the scheduler may have advanced sequences for a step that
        never launched, and the pending step may never be read. Afterwards the engine is as if
        idle: no pending step, no sequence, every seat free and no page referenced (pages named
        in the prefix cache wait in its LRU, the rest are plain free pages). A named page is
        safe to reuse: a page is only named once the step that writes it has been launched."""
        dropped = list(self.sequences)
        self._pending, self._rows = None, {}
        for seq in self.scheduler.drop_all():
            if seq.request_id not in self.sequences:  # left the engine but not the scheduler: a bug, dropped too
                dropped.append(seq.request_id)
        self.sequences.clear()
        self.outputs.clear()
        self._prompt_lps.clear()
        # A step program that failed on the device may have consumed the buffers donated to it
        # (deleted) without returning new ones: the engine then starts from fresh buffers, and
        # the prefix cache forgets every page (their content went with them).
        buffers = [self.k_pages, self.v_pages, self.counts, self.seen, self.prev_tokens]
        if self.draft is not None:
            buffers += [self.draft.k_pages, self.draft.v_pages]
        if any(x.is_deleted() for x in buffers):
            for x in buffers:
                if not x.is_deleted():
                    x.delete()  # before the new ones are allocated: no two caches at once
            self._allocate_device_state()
            self.allocator.reset_prefix_cache()
        return dropped

    def has_unfinished_requests(self) -> bool:
        return bool(self.sequences) or self._pending is not None

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Launch the next step, then read the previous one: its tokens become events."""
        batch = self.scheduler.schedule()
        if not batch and self._pending is None and self.scheduler.has_work():
            raise RuntimeError("the scheduler could not place any request: this is a bug, please report it")
        launched = self._launch(batch) if batch else None
        events = self._read(self._pending) if self._pending else []
        self._pending = launched
        return events

    def run(self):
        """Step until every request is done, yielding events as they come."""
        while self.has_unfinished_requests():
            yield from self.step()

    def _launch(self, batch: list[Scheduled]) -> _Launched:
        with use_mesh(self.mesh):
            if self.draft is not None:
                batch = self._fill_drafts(batch)
        wire, allowed, wants_prompt_logprobs = self._pack(batch)
        with use_mesh(self.mesh):
            if self.draft is not None:  # the draft's cache follows the target's, step by step
                self.draft.step(wire, self.prev_tokens)
            self._reset_penalties(batch)
            result, hidden, logits = self._run_step(wire, allowed)
            top_lp = self._top_lp_program(len(logits), logits) if _wants_top_logprobs(batch) else None
            prompt_lp = (self._prompt_lp_program(wire.num_tokens, self.state, hidden, wire)
                         if wants_prompt_logprobs else None)
        for s in batch:
            self.scheduler.register_full_pages(s.seq)
        rows = _first_rows(batch)
        self._rows = dict(zip((s.seq for s in batch), rows))  # where each sequence's token lands
        return _Launched(batch, result, top_lp, prompt_lp, rows)

    def _run_step(self, wire: StepWire, allowed):
        """One step's program (its bucket: the token count), keeping the state it updates."""
        (result, hidden, logits, self.prev_tokens, self.k_pages, self.v_pages, self.counts,
         self.seen) = self._step_program(wire.num_tokens, self.state, self.k_pages, self.v_pages, wire, allowed,
                                         self.prev_tokens, self.counts, self.seen)
        return result, hidden, logits

    def _fill_drafts(self, batch: list[Scheduled]) -> list[Scheduled]:
        """The draft model's tokens for the sequences the scheduler gave room for drafts: k greedy
        steps from each one's last token, in one program, read back once."""
        want = [i for i, s in enumerate(batch) if s.draft and s.draft[0] == UNFILLED]
        if not want:
            return batch
        R = self.draft_rows_bucket(len(want))
        first = np.zeros(R, np.int32)
        positions = np.full((self.draft.k, R), -1, np.int32)
        slots = np.full((self.draft.k, R), -1, np.int32)
        pages = np.zeros((R, self.page_table_width), np.int32)
        for r, i in enumerate(want):
            seq, n = batch[i].seq, len(batch[i].draft)
            first[r] = seq.token_ids[-1]  # known: a sequence with drafts is never in flight
            pos = len(seq.token_ids) - 1 + np.arange(n)
            page_of = np.asarray(seq.pages, np.int32)
            positions[:n, r] = pos
            slots[:n, r] = page_of[pos // self.page_size] * self.page_size + pos % self.page_size
            pages[r, : len(seq.pages)] = seq.pages
        drafts = self._to_host(self.draft.propose(first, positions, slots, pages, len(want), self._host_to_mesh))
        batch = list(batch)
        for r, i in enumerate(want):
            s = batch[i]
            draft = tuple(int(t) for t in drafts[: len(s.draft), r])
            batch[i] = dataclasses.replace(s, draft=draft)
            s.seq.spec.pending = draft
        return batch

    def draft_rows_bucket(self, n: int) -> int:
        # From 8 rows on every backend: the draft model's proposal programs stay few.
        return bucket(n, MIN_SEQS_BUCKET, self.max_seqs_bucket)

    # ---- the program set ------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        """Step sizes in tokens: powers of two up to max_num_batched_tokens (rounded up), from
        min_token_bucket; on an accelerator also 1 (ONE_TOKEN_PROGRAM)."""
        return self._token_buckets

    def seqs_bucket(self, tokens: int) -> int:
        """The sequence axis of a step of `tokens` (a bucket): a step holds at most that many
        sequences, and at most max_num_seqs; tied to the token bucket, so it adds no programs.
        At least min_seqs_bucket (MIN_SEQS_BUCKET, or MIN_SEQS_BUCKET_CPU on a CPU)."""
        return min(max(tokens, self.min_seqs_bucket), self.max_seqs_bucket)

    def programs(self) -> int:
        """Programs a warm engine has compiled: a step and a prompt-logprobs program per token
        bucket, a top-logprobs program per sequence bucket, and the penalty-row reset; with a
        draft model, its step per token bucket and its proposal program per row bucket."""
        n = 2 * len(self.token_buckets()) + len(self._seqs_buckets()) + 1
        if self.draft is not None:
            n += len(self.token_buckets()) + len(self._draft_row_buckets())
        return n

    def _seqs_buckets(self) -> list[int]:
        return sorted({self.seqs_bucket(T) for T in self.token_buckets()})

    def _draft_row_buckets(self) -> list[int]:
        return powers_of_two(self.draft_rows_bucket(1), self.max_seqs_bucket)

    def warmup(self) -> tuple[int, float]:
        """Compile (or load from the persistent cache) every program a request can need, by running
        each once on an empty batch (no sequence: no page is written, no token kept). Returns
        (programs, seconds)."""
        import time

        if self.has_unfinished_requests():
            raise RuntimeError("warmup() runs before any request is added")
        t0 = time.perf_counter()
        top_lp_warm = set()
        with use_mesh(self.mesh):
            for T in self.token_buckets():
                S = self.seqs_bucket(T)
                wire = self._host_to_mesh(to_wire(empty_inputs(T, S, self.page_table_width, self.config.max_num_seqs),
                                                  SamplingArrays.from_params([], pad_to=S)))
                if self.draft is not None:
                    self.draft.step(wire, self.prev_tokens)
                result, hidden, logits = self._run_step(wire, self._allowed(S, []))
                jax.block_until_ready(self._prompt_lp_program(T, self.state, hidden, wire))
                if logits.shape[0] not in top_lp_warm:  # one per sequence bucket
                    top_lp_warm.add(logits.shape[0])
                    jax.block_until_ready(self._top_lp_program(logits.shape[0], logits))
            self.counts, self.seen = self._reset_row_program(None, self.counts, self.seen, *self._penalty_row(0, [], 0))
            for R in self._draft_row_buckets() if self.draft is not None else ():
                k = self.draft.k  # no row: every slot -1, nothing written
                jax.block_until_ready(self.draft.propose(
                    np.zeros(R, np.int32), np.full((k, R), -1, np.int32), np.full((k, R), -1, np.int32),
                    np.zeros((R, self.page_table_width), np.int32), 0, self._host_to_mesh))
            jax.block_until_ready((result, self.counts))
        return self.programs(), time.perf_counter() - t0

    def _pack(self, batch: list[Scheduled]):
        """Host arrays of one step, padded to its buckets."""
        n_tok = sum(s.n for s in batch)
        T = next(b for b in self.token_buckets() if b >= n_tok)
        S = self.seqs_bucket(T)
        assert sum(s.rows for s in batch) <= S, "more sampling rows than the step's bucket holds"
        pages = self.page_table_width
        tokens = np.zeros(T, np.int32)
        prev_index = np.full(T, -1, np.int32)
        positions = np.full(T, -1, np.int32)
        slot_mapping = np.full(T, -1, np.int32)
        next_ids = np.full(T, -1, np.int32)
        kv_lens = np.zeros(S, np.int32)
        page_indices = np.zeros((S, pages), np.int32)
        cu_q_lens = np.zeros(S + 1, np.int32)
        logits_at = np.zeros(S, np.int32)
        slots = np.full(S, self.config.max_num_seqs, np.int32)
        sampled = np.zeros(S, bool)
        step = np.zeros(S, np.int32)
        prev_rows = self._rows if self._pending else {}
        params, constrained = [], []
        t = r = 0
        for i, s in enumerate(batch):
            seq = s.seq
            own = s.n - len(s.draft)  # the sequence's own tokens, then its drafts
            if s.n == 1 and not s.draft:  # a decode token: scalars (a NumPy call per field costs ~1 us)
                p = s.start
                if p < len(seq.token_ids):
                    tokens[t] = seq.token_ids[p]
                else:  # still on the device, from the previous step
                    assert p == len(seq.token_ids) and seq in prev_rows, "a decode token is missing"
                    prev_index[t] = prev_rows[seq]
                positions[t] = p
                slot_mapping[t] = seq.pages[p // self.page_size] * self.page_size + p % self.page_size
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
                slot_mapping[t : t + s.n] = page_of[pos // self.page_size] * self.page_size + pos % self.page_size
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
            params += [seq.params] * s.rows
            if s.sample and seq.matcher is not None:
                constrained.append((r, seq.matcher))
            t += s.n
            r += s.rows
        cu_q_lens[len(batch) + 1 :] = t
        wire = self._host_to_mesh(to_wire(  # two transfers for all of the step's host arrays
            StepInputs(tokens, prev_index, positions, slot_mapping, next_ids, kv_lens, page_indices, cu_q_lens,
                       np.int32(len(batch)), logits_at, slots, sampled, step),
            SamplingArrays.from_params(params, pad_to=S)))
        wants_prompt_logprobs = any(s.seq.params.prompt_logprobs is not None and s.start < len(s.seq.prompt_ids)
                                    for s in batch)
        return wire, self._allowed(S, constrained), wants_prompt_logprobs

    def _allowed(self, S: int, constrained: list[tuple[int, Matcher]]) -> jax.Array:
        """The step's grammar bitmask [S, vocab / 32]: all ones unless some row is constrained."""
        if constrained:  # placed as the resident one is (another placement is another program)
            return self._replicated(self.masks.build(S, constrained))
        if S not in self._all_allowed:
            self._all_allowed[S] = self._replicated(self.masks.all_ones[:S])
        return self._all_allowed[S]

    def _replicated(self, x: jax.Array) -> jax.Array:
        """Placed as the step's outputs are, so feeding them back does not recompile."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.multiprocess:  # each process gives its own (identical) copy: no cross-process check
            return jax.make_array_from_process_local_data(replicated, np.asarray(x))
        return jax.device_put(x, replicated)

    def _host_to_mesh(self, tree):
        """Host arrays (identical on every process) -> what the step can take. One process: the
        NumPy arrays themselves; the jitted call moves them (a step's ~23 small arrays: ~0 us
        there, against 0.5 ms for jax.device_put of the tree on a CPU, ~3 ms on an H200 host)."""
        if self.multiprocess:
            return jax.tree.map(self._replicated, tree)
        return tree

    def _to_host(self, tree):
        """Device results -> NumPy. Replicated arrays are read from a local copy; anything
        else is gathered from every process."""
        if not self.multiprocess:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        def get(x):
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(get, tree)

    def _reset_penalties(self, batch: list[Scheduled]) -> None:
        """A request that uses penalties starts from its own tokens in its slot's row (rows of
        other requests may hold anything: neutral penalties ignore them)."""
        for s in batch:
            seq = s.seq
            if _uses_penalties(seq.params) and s.admitted:
                row = self._penalty_row(seq.slot, seq.token_ids, len(seq.prompt_ids))
                self.counts, self.seen = self._reset_row_program(None, self.counts, self.seen, *row)

    def _penalty_row(self, slot: int, token_ids: list[int], num_prompt: int):
        ids = np.full(bucket(self.max_model_len, MIN_TOKEN_BUCKET), self.cfg.vocab_size, np.int32)
        ids[: len(token_ids)] = token_ids
        return self._host_to_mesh((np.int32(slot), ids, np.int32(num_prompt)))

    def _read(self, launched: _Launched) -> list[StepEvent]:
        """Bring a step's tokens to the host and turn them into events."""
        host = self._to_host(launched.result)
        top = self._to_host(launched.top_lp) if launched.top_lp is not None else None
        prompt_lp = self._to_host(launched.prompt_lp) if launched.prompt_lp is not None else None
        events = []
        t = 0
        for s, row in zip(launched.batch, launched.rows):
            seq = s.seq
            packed = slice(t, t + s.n)
            t += s.n
            if seq.status is Status.FINISHED:
                continue  # aborted or stopped after this step was launched: its output is dropped
            if prompt_lp is not None and seq.params.prompt_logprobs is not None:
                self._collect_prompt_logprobs(seq, s, packed, prompt_lp)
            if not s.sample:
                continue
            seq.in_flight -= 1
            kept = 1
            if s.draft:  # keep the drafts the target sampled too, then the token after them
                accepted = self.speculator.accept(seq.spec, s.draft, host.tokens[row : row + s.rows])
                self.scheduler.rollback(seq, len(s.draft) - accepted)
                kept += accepted
            for r in range(row, row + kept):
                event = self._emit(seq, int(host.tokens[r]), _row_logprobs(host, top, r, seq.params.logprobs))
                events.append(event)
                if event.finished:
                    break
        return events

    def _emit(self, seq: Sequence, token: int, logprobs) -> StepEvent:
        """One sampled token of a sequence -> its event; a finished sequence leaves the engine."""
        seq.token_ids.append(token)
        out = self.outputs[seq.request_id]
        # The grammar is done when it has stopped, or if it rejects the token (only if the
        # mask allowed nothing: the request ends rather than leaving its grammar).
        done = seq.matcher is not None and (not seq.matcher.accept(token) or seq.matcher.stopped)
        event = out.add(token, logprobs, grammar_done=done)
        if out.count == 1 and seq.params.prompt_logprobs is not None:
            event.prompt_logprobs = self._finish_prompt_logprobs(seq)
        if event.finished:
            event.num_cached_tokens = seq.num_cached_tokens or 0
            self.scheduler.finish(seq)
            self.sequences.pop(seq.request_id, None)
            self.outputs.pop(seq.request_id, None)
        else:
            self.scheduler.register_full_pages(seq)
        return event

    def _collect_prompt_logprobs(self, seq: Sequence, s: Scheduled, rows: slice, prompt_lp) -> None:
        actual, top_ids, top_lp = prompt_lp
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


def _first_rows(batch: list[Scheduled]) -> list[int]:
    """Each scheduled sequence's first sampling row (rows are packed in batch order)."""
    return list(itertools.accumulate((s.rows for s in batch[:-1]), initial=0)) if batch else []


def _wants_top_logprobs(batch: list[Scheduled]) -> bool:
    return any(s.sample and s.seq.params.logprobs for s in batch)


def _row_logprobs(host, top, b: int, n: int | None) -> dict[int, float] | None:
    """Row b's logprobs for a request asking for n alternatives: the chosen token's, then the
    top n (top: the step's (logprobs, ids) from _top_logprobs)."""
    if n is None:
        return None
    out = {int(host.tokens[b]): float(host.logprob[b])}
    if n:
        top_lp, top_ids = top
        for tid, lp in zip(top_ids[b, :n], top_lp[b, :n]):
            out.setdefault(int(tid), float(lp))
    return out
