"""The serving engine: continuous batching over a paged KV cache, one jitted step for any mix.

Each step packs the scheduled tokens of every sequence (prefill chunks and single decode tokens
alike) into one row, runs the model once over the paged cache and samples one token per
sequence (plus one per draft of a speculating sequence). The engine is the loop that wires the
stages of a step together, on typed hand-offs (plan.py):

    plan = scheduler.schedule()                        which sequences, which tokens (scheduler.py)
    launched = runner.launch(plan, after=pending)      on the device, not waited for (runner.py)
    scheduler.launched(plan)                           its full pages may be named in the prefix cache
    result = runner.collect(pending)                   the previous step's tokens, on the host
    outputs = output_processor.process(pending.plan, result)   events, kept tokens (output_processor.py)
    scheduler.update(pending.plan, outputs)            the only writer of the sequences' state

The host stays one step ahead of the device: it launches step i+1 before reading step i's
tokens, so its reading, detokenizing and scheduling of the next step overlap the device's work;
a decode token that is still on the device is fed from step i's output (`prev_index`), so the
device never waits for the host's bookkeeping.

The compiled programs form a small, known set (buckets.py, step_programs.py; `programs()`),
compiled up front by `warmup()` so that no request waits on a compile, whatever it hits in the
prefix cache.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
from jax.sharding import Mesh

from mistral_jax.cache.page_allocator import PageAllocator
from mistral_jax.cache.paged import page_bytes
from mistral_jax.engine import cache_size, sizing
from mistral_jax.engine.args import check_serving_ranges
from mistral_jax.engine.buckets import Buckets
from mistral_jax.engine.draft import DraftModel
from mistral_jax.engine.output_processor import OutputProcessor
from mistral_jax.engine.outputs import OutputState, StepEvent
from mistral_jax.engine.placement import shared_seed
from mistral_jax.engine.plan import StepPlan
from mistral_jax.engine.request_limits import RequestLimits
from mistral_jax.engine.runner import Launched, ModelRunner
from mistral_jax.engine.scheduler import Scheduler, Sequence
from mistral_jax.engine.speculative import SpecState, SpeculativeConfig, Speculator
from mistral_jax.model.kernels import Kernels, choose_kernels
from mistral_jax.model.transformer import Transformer
from mistral_jax.runtime.sharding import mesh_size
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.sample.structured import Matcher
from mistral_jax.tokenizer import Tokenizer


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
        check_serving_ranges(self)  # the same list EngineArgs checks


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, mesh: Mesh, config: EngineConfig,
                 draft: Transformer | None = None, kernels: Kernels | None = None):
        """draft: the draft model of speculative_config's draft_model method, loaded. kernels: the
        ones the model was loaded for (build's choose_kernels); None: chosen here for the mesh's
        platform and config.attention_impl. Their platform sets the token buckets too."""
        self.cfg, self.dtype, self.quantization = model.cfg, model.dtype, model.quantization
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.config = config
        # Several processes (multi-host): each runs this same engine; step inputs are built on every
        # host alike and placed replicated; only the local devices are touched from here.
        self.multiprocess = jax.process_count() > 1
        self.local_device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
        self.max_model_len = config.max_model_len
        self.page_size = config.block_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        kernels = kernels or choose_kernels(mesh.devices.flat[0].platform, attention=config.attention_impl)
        if config.attention_impl not in ("auto", kernels.attention):
            raise ValueError(f"attention_impl={config.attention_impl!r}, but the kernels given run "
                             f"{kernels.attention!r}")
        self.kernels = kernels
        self.buckets = Buckets.make(on_cpu=kernels.platform == "cpu", max_num_seqs=config.max_num_seqs,
                                    max_num_batched_tokens=config.max_num_batched_tokens,
                                    max_model_len=self.max_model_len, page_size=self.page_size)
        self.attention_impl = kernels.attention
        spec = config.speculative_config
        if (draft is not None) != (spec is not None and spec.method == "draft_model"):
            raise ValueError("a draft model goes with speculative_config's draft_model method, and only with it")
        self.draft = DraftModel(draft, self.cfg, spec.num_speculative_tokens) if draft is not None else None

        self.num_pages = self._size_cache()
        self.allocator = PageAllocator(self.num_pages, self.page_size, config.enable_prefix_caching)
        self.limits = RequestLimits(self.cfg.vocab_size, self.max_model_len, self.page_size, self.num_pages)
        self.speculator = Speculator(spec) if spec is not None else None
        # A step's sampling rows (sequences + drafts) fit its sequence axis: rows <= tokens <= T
        # and rows <= max_seqs, so buckets.seqs(T) holds them; drafts add no program.
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   speculator=self.speculator, max_rows=self.buckets.max_seqs)
        self.runner = ModelRunner(model, self.draft, mesh, self.buckets, num_pages=self.num_pages,
                                  page_size=self.page_size, max_num_seqs=config.max_num_seqs,
                                  attention_impl=self.attention_impl)
        self.output_processor = OutputProcessor(tokenizer)
        self.sequences: dict[str, Sequence] = {}  # the requests not finished yet
        self._pending: Launched | None = None  # the launched step not read yet
        self._ids = itertools.count()
        # Default seeds must agree across processes, or their replicated inputs would differ.
        self._rng = np.random.default_rng(config.seed if config.seed is not None
                                          else shared_seed() if self.multiprocess else None)

    # ---- requests -------------------------------------------------------------------------

    def check_request(self, ids: list[int], params: SamplingParams, where: str) -> SamplingParams:
        """Reject bad input before any work starts, with a ValueError naming the fix (anything
        the step could not pack included: RequestLimits.check); returns the checked params the
        engine runs (max_tokens=None filled up to the context, seed=None drawn)."""
        return self.limits.check(ids, params, where, self._rng)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, index: int = 0,
                    request_id: str | None = None, matcher: Matcher | None = None) -> str:
        """matcher: the request's compiled grammar, when the caller built it off this thread
        (a complex grammar can take a good part of a second to build); else built here from
        params.structured_outputs. A request is checked (check_request) before the scheduler
        sees it: nothing it carries can fail inside a later step."""
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.sequences:
            raise ValueError(f"request_id {request_id!r} is already running: use a new id")
        params = self.check_request(list(prompt_ids), params, f"prompt {index}")
        if matcher is None and params.structured_outputs is not None:
            matcher = self.matcher(params)
        seq = Sequence(request_id, [int(t) for t in prompt_ids], params, index, matcher=matcher)
        if self.speculator is not None and matcher is None and not seq.uses_penalties:
            # Drafts are sampled with the penalty counts and grammar state of the step's start, which
            # would be wrong past the first draft: such requests decode plainly.
            seq.spec = SpecState()
        self.sequences[request_id] = seq
        self.output_processor.add(request_id, index, params)
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
        self.output_processor.drop(seq.request_id)
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
        self._pending = None
        for seq in self.scheduler.drop_all():
            if seq.request_id not in self.sequences:  # left the engine but not the scheduler: a bug, dropped too
                dropped.append(seq.request_id)
        self.sequences.clear()
        self.output_processor.clear()
        # Fresh device buffers if a failed program consumed them: the prefix cache then forgets
        # every page (their content went with them).
        if self.runner.recover():
            self.allocator.reset_prefix_cache()
        return dropped

    def has_unfinished_requests(self) -> bool:
        return bool(self.sequences) or self._pending is not None

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Launch the next step, then read the previous one: its tokens become events."""
        plan = self.scheduler.schedule()
        if not plan and self._pending is None and self.scheduler.has_work():
            raise RuntimeError("the scheduler could not place any request: this is a bug, please report it")
        launched = self._launch(plan) if plan else None
        events = self._read(self._pending) if self._pending is not None else []
        self._pending = launched
        return events

    def run(self):
        """Step until every request is done, yielding events as they come."""
        while self.has_unfinished_requests():
            yield from self.step()

    def _launch(self, plan: StepPlan) -> Launched:
        launched = self.runner.launch(plan, after=self._pending)
        self.scheduler.launched(launched.plan)
        return launched

    def _read(self, launched: Launched) -> list[StepEvent]:
        """A launched step's tokens -> events; the scheduler takes in what each sequence kept."""
        result = self.runner.collect(launched)
        outputs = self.output_processor.process(launched.plan, result)
        self.scheduler.update(launched.plan, outputs)
        for event in outputs.events:
            if event.finished:
                self.sequences.pop(event.request_id, None)
        return outputs.events

    def warmup(self) -> tuple[int, float]:
        """Compile (or load from the persistent cache) every program a request can need, by running
        each once on an empty batch (no sequence: no page is written, no token kept). Returns
        (programs, seconds)."""
        if self.has_unfinished_requests():
            raise RuntimeError("warmup() runs before any request is added")
        return self.runner.warmup()

    # ---- the program set ------------------------------------------------------------------

    def token_buckets(self) -> list[int]:
        """Step sizes in tokens: powers of two up to max_num_batched_tokens (rounded up), from
        the backend's minimum; on an accelerator also 1 (buckets.ONE_TOKEN_PROGRAM)."""
        return list(self.buckets.tokens)

    def seqs_bucket(self, tokens: int) -> int:
        """The sequence axis of a step of `tokens` (a bucket): Buckets.seqs."""
        return self.buckets.seqs(tokens)

    def draft_rows_bucket(self, n: int) -> int:
        return self.buckets.draft_rows(n)

    def programs(self) -> int:
        """Programs a warm engine has compiled (ModelRunner.programs)."""
        return self.runner.programs()

    def programs_held(self) -> int:
        """Executables compiled or loaded so far (a rise after warm-up is a compile a request waited on)."""
        return self.runner.programs_held()

    # ---- sizing ---------------------------------------------------------------------------

    def device_memory(self) -> dict | None:
        """The first device's allocator statistics (bytes_limit, bytes_in_use); None on CPU."""
        stats = self.local_device.memory_stats()
        return stats if stats and "bytes_limit" in stats else None

    def _activation_bytes(self) -> int:
        return cache_size.activation_bytes(self.cfg, self.config.max_num_batched_tokens, self.config.max_num_seqs)

    def _size_cache(self) -> int:
        per_page = page_bytes(self.cfg, self.page_size, self.dtype)
        if self.draft is not None:
            per_page += self.draft.page_bytes(self.page_size)
        if self.config.num_pages is not None:
            return self.config.num_pages
        try:
            return cache_size.num_pages(
                per_page, stats=self.device_memory(), gpu_memory_utilization=self.config.gpu_memory_utilization,
                activations=self._activation_bytes(), tp=mesh_size(self.mesh, "tp"),
                max_num_seqs=self.config.max_num_seqs, max_pages_per_seq=self.max_pages_per_seq)
        except ValueError as e:
            if self.kernels.platform != "tpu":
                raise
            hint = sizing.fit_hint(self.cfg, self.dtype, self.quantization,
                                   max_model_len=self.max_model_len, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens,
                                   page_size=self.page_size)
            raise ValueError(f"{e}. On TPU, {hint}") from None

    def describe_cache(self) -> str:
        gib = self.num_pages * page_bytes(self.cfg, self.page_size, self.dtype) / 2**30 / mesh_size(self.mesh, "tp")
        return (f"KV cache: {self.num_pages} pages of {self.page_size} tokens = "
                f"{(self.num_pages - 1) * self.page_size:,} tokens, {gib:.2f} GiB per device on "
                f"{self.mesh.devices.size} x {self.mesh.devices.flat[0].device_kind}; attention "
                f"{self.attention_impl}; prefix cache {'on' if self.config.enable_prefix_caching else 'off'}")

    # ---- what callers read of the stages --------------------------------------------------

    @property
    def outputs(self) -> dict[str, OutputState]:
        """Each unfinished request's output so far."""
        return self.output_processor.states

    @property
    def graphdef(self):
        return self.runner.graphdef

    @property
    def state(self):
        """The model's weights (nnx state)."""
        return self.runner.state

    @property
    def page_table_width(self) -> int:
        return self.buckets.page_table_width

    @property
    def k_pages(self) -> jax.Array:
        return self.runner.k_pages

    @property
    def v_pages(self) -> jax.Array:
        return self.runner.v_pages
