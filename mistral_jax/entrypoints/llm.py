"""`LLM`: the Python API, shaped like vLLM's offline `LLM` so users can switch in one line."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

from mistral_jax.runtime import distributed
from mistral_jax.loading import hub
from mistral_jax.loading.checkpoint import OrbaxCheckpoint, open_checkpoint
from mistral_jax.loading.default_model import default_model_path
from mistral_jax.engine.engine import Engine, EngineConfig
from mistral_jax.engine.outputs import StepEvent
from mistral_jax.model.projections import prefers_input_major
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.runtime.sharding import check_mesh, parse_mesh
from mistral_jax.tokenizer.tokenizer import ToolCall, load_tokenizer
from mistral_jax.loading.weights import load_weights, random_weights

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32,
          "float16": jnp.float16, "fp16": jnp.float16}


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per generated token: {token_id: logprob}
    finish_reason: str | None  # "stop" | "length"
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


def resolve_dtype(dtype) -> jnp.dtype:
    """"auto": bf16 on accelerators; f32 on CPU, where bf16 matmuls are emulated and slow."""
    if dtype in (None, "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of 'auto', {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def enable_compilation_cache() -> None:
    """Keep compiled programs across restarts (JAX's persistent cache), unless the user chose."""
    if jax.config.jax_compilation_cache_dir is None:
        path = os.environ.get("MISTRAL_JAX_CACHE_DIR", str(Path.home() / ".cache" / "mistral_jax" / "xla"))
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX keeps only programs that took >= 1 s to compile; the many small ones (sampling
        # tails, the penalty reset, short buckets) then recompile at every start. Measured with
        # the tiny model on a CPU: a warm start's warm-up 7.6 -> 5.9 s with every program kept.
        if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default: not the user's choice
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _tensor_parallel_mesh(mesh, tensor_parallel_size: int | None):
    """vLLM's tensor_parallel_size as this engine's mesh: tp=N (alone, or the same as mesh's tp)."""
    if tensor_parallel_size is None:
        return mesh
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r}: give an integer >= 1")
    if mesh is not None and parse_mesh(mesh).shape.get("tp", 1) != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} and mesh={mesh!r} disagree: give one of them "
                         "(mesh='dp=D,tp=T' for data parallel too)")
    if mesh is not None:
        return mesh
    devices = jax.device_count()
    if tensor_parallel_size > devices:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices, but "
                         f"{devices} {jax.default_backend()} device(s) are visible: use at most {devices} (the "
                         "model's kv heads must also divide it)")
    return f"tp={tensor_parallel_size}"


GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(generation_config: str, model_path: str) -> dict:
    """vLLM's generation_config: "auto" takes the model's generation_config.json sampling fields
    (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) as the defaults of
    requests that do not set them; "vllm" none; a folder, its generation_config.json."""
    if generation_config == "vllm":
        return {}
    folder = Path(model_path) if generation_config == "auto" else Path(generation_config)
    if generation_config != "auto" and not folder.is_dir():
        raise ValueError(f"generation_config={generation_config!r}: give 'auto', 'vllm' or a folder holding "
                         "generation_config.json")
    path = folder / "generation_config.json"
    if not path.is_file():
        if generation_config != "auto":
            raise ValueError(f"generation_config={generation_config!r}: {path} does not exist")
        return {}
    from mistral_jax.config import read_json

    raw = read_json(path)
    defaults = {ours: raw[theirs] for theirs, ours in GENERATION_FIELDS.items() if raw.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{path}: its sampling defaults are invalid ({e}). Fix: generation_config='vllm' to "
                         "ignore them") from None
    return defaults


class LLM:
    """Load a model and generate.

    model: a Hugging Face Hub repo id ("mistralai/Mistral-Small-24B-Instruct-2501": fetched into
    huggingface_hub's cache, or download_dir; HF_TOKEN, HF_HUB_OFFLINE and revision apply), a
    Mistral checkpoint directory (params.json + consolidated*.safetensors), a Hugging Face
    directory (config.json + model*.safetensors), a .gguf file, or an Orbax checkpoint
    (python -m mistral_jax.convert). None: the embedded demo model, SmolLM2-135M-Instruct.

    vLLM's switches, with vLLM's meaning (hub.py): tokenizer_mode ("auto", "mistral", "hf"),
    config_format ("auto", "mistral", "hf"), load_format ("auto", "mistral", "safetensors",
    "gguf", "dummy"); a Hub repo fetches only the files they pick. tensor_parallel_size: N is
    the mesh tp=N. generation_config: "auto" (the model's generation_config.json sampling
    fields are the defaults of get_default_sampling_params() and of requests that leave them
    unset), "vllm" (none), or a folder. seed (vLLM's, default 0): requests that set no seed draw
    theirs from one generator started with it, so a program's run repeats itself; None: fresh.

    Serving settings keep vLLM's names: block_size (tokens per KV page), num_pages (explicit
    page count) or gpu_memory_utilization (fraction of device memory), max_num_seqs,
    max_num_batched_tokens (tokens per step; longer prompts are prefilled in chunks),
    enable_prefix_caching. attention_impl: "auto" (the Pallas kernel of the backend), or
    "reference" (the plain-jnp twin), "triton", "tpu".

    quantization: None, or "fp8" to quantize a 16/32-bit checkpoint's layer projections at load
    (e4m3, one scale per output channel; activations quantized per token at run time). An FP8
    checkpoint (compressed-tensors "FP8 dynamic") always loads as fp8. fp8_impl: the FP8 matmul
    (pallas_kernels.fp8_matmul's impl: "auto", "reference", "xla", "triton", "mgpu", "tpu").

    coordinator_address ("host:port" of process 0), num_processes, process_id: a multi-host run,
    one process per host, all running the same program (mistral_jax.runtime.distributed.initialize; the
    environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID work too).
    Only process 0 prints.

    warmup: compile every program the settings allow before LLM() returns (Engine.programs: a
    step and a prompt-logprobs program per token bucket, times the page buckets of the reference
    attention, and one more), so that no request waits on a compile, prefix-cache hits included.
    None: on where the devices are accelerators, off on a CPU (start-up time matters more there;
    programs then compile as requests first need them). `warmup_programs` and `warmup_seconds`
    report it; the persistent compilation cache makes a restart's warm-up a fraction of the first.

    speculative_config: vLLM's dict (or its JSON text), e.g. {"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 5, "prompt_lookup_min": 2} or
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}: decoding sequences
    propose tokens that the model checks in the same step; the output is the same as without it
    (speculative.py; a draft model must share the target's vocabulary, draft.py).
    `llm.engine.speculator.stats` counts proposals and acceptances.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, tokenizer: str | None = None, progress: bool = True, *,
                 block_size: int = 16, num_pages: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 attention_impl: str = "auto", quantization: str | None = None, fp8_impl: str = "auto",
                 mesh=None, coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, warmup: bool | None = None, load_format: str = "auto",
                 config: str | None = None, speculative_config: dict | str | None = None,
                 tokenizer_mode: str = "auto", config_format: str = "auto", tensor_parallel_size: int | None = None,
                 download_dir: str | None = None, revision: str | None = None, generation_config: str = "auto",
                 seed: int | None = 0):
        # Multi-host: join the other processes before JAX starts (see distributed.py; the
        # environment's JAX_COORDINATOR_ADDRESS etc. work too). Only process 0 reports.
        distributed.initialize(coordinator_address, num_processes, process_id)
        progress = progress and distributed.is_main_process()
        from pallas_kernels import fp8_matmul
        from pallas_kernels.ragged_paged_attention import IMPLS

        from mistral_jax.model.transformer import QUANTIZATIONS

        if attention_impl not in IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is not one of {IMPLS}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r} is not supported; use None (the checkpoint's "
                             "own weights) or 'fp8' (e4m3 projections, per-channel scales, quantized at load)")
        if fp8_impl not in fp8_matmul.IMPLS:
            raise ValueError(f"fp8_impl={fp8_impl!r} is not one of {fp8_matmul.IMPLS}")
        hub.check_formats(load_format, config_format, tokenizer_mode)  # before anything is opened or fetched
        mesh = _tensor_parallel_mesh(mesh, tensor_parallel_size)
        self.mesh = parse_mesh(mesh)  # a bad spec fails before anything is opened
        enable_compilation_cache()
        self.dtype = resolve_dtype(dtype)
        self.timings: dict[str, float] = {}  # seconds of each start-up stage (generate --verbose)
        t0 = time.perf_counter()
        fetch = dict(config_format=config_format, tokenizer_mode=tokenizer_mode, revision=revision,
                     download_dir=download_dir)
        if load_format == "dummy":  # random weights of a real shape (dummy.py)
            from mistral_jax.loading.dummy import dummy_config, dummy_tokenizer

            spec = config or model
            if spec is None:
                raise ValueError("load_format='dummy' needs config= (e.g. 'mistral-small-2501') or a model directory "
                                 "holding params.json")
            if hub.is_repo_id(str(spec)):  # a Hub repo: its config and tokenizer only
                spec = str(hub.resolve_model(str(spec), load_format="dummy", weights=False, **fetch).path)
            self.model_path, checkpoint = str(spec), None
            self.config = dummy_config(spec)
            tokenizer = tokenizer or dummy_tokenizer(spec, self.config)
        else:
            resolved = hub.resolve_model(str(model) if model is not None else default_model_path(),
                                         load_format=load_format, **fetch)
            self.model_path = str(resolved.path)
            checkpoint = open_checkpoint(resolved.path, resolved.layout)
            self.config = checkpoint.config
        if max_model_len is not None and not 1 < max_model_len <= self.config.max_seq_len:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {self.config.max_seq_len}] "
                             "(the model's context)")
        self.max_model_len = max_model_len or self.config.max_seq_len
        engine_config = EngineConfig(  # validates the settings before the slow weight load
            self.max_model_len, block_size=block_size, num_pages=num_pages,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            attention_impl=attention_impl, speculative_config=speculative_config, seed=seed)
        check_mesh(self.config, self.mesh)
        self.timings["open checkpoint (config, tensor index)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if tokenizer is not None and hub.is_repo_id(str(tokenizer)):  # vLLM's tokenizer= may name a Hub repo too
            tokenizer = str(hub.resolve_model(str(tokenizer), load_format="dummy", weights=False, **fetch).path)
        self.tokenizer_source = str(tokenizer or self.model_path)  # a file, directory or GGUF: load_tokenizer's input
        self.tokenizer_mode = tokenizer_mode
        self.tokenizer = load_tokenizer(self.tokenizer_source, tokenizer_mode)
        self.default_sampling = generation_defaults(generation_config, self.model_path)
        self.timings["tokenizer"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model_ = self._load(checkpoint, self.config, progress, quantization, fp8_impl)
        self.quantization = model_.quantization  # an FP8 checkpoint sets it even when None was asked
        self.load_seconds = self.timings["weights"] = time.perf_counter() - t0
        draft = None
        spec = engine_config.speculative_config
        if spec is not None and spec.method == "draft_model":
            t0 = time.perf_counter()
            draft_checkpoint = open_checkpoint(spec.model)
            check_mesh(draft_checkpoint.config, self.mesh)
            draft = self._load(draft_checkpoint, draft_checkpoint.config, progress, None, fp8_impl)
            self.timings["draft model"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine = Engine(model_, self.tokenizer, self.mesh, engine_config, draft=draft)
        self.timings["engine (KV cache)"] = time.perf_counter() - t0
        if progress:
            impl = fp8_matmul.describe_impl(fp8_impl)
            weights = (f"weights fp8 (e4m3 per-channel, per-token dynamic activations, fp8_matmul {impl})"
                       if self.quantization == "fp8" else f"weights {jnp.dtype(self.dtype).name}")
            print(f"[{weights}; {self.engine.describe_cache()}]", file=sys.stderr)
        if warmup is None:  # an accelerator: a request must never wait on a compile; a CPU: start fast
            warmup = self.mesh.devices.flat[0].platform != "cpu"
        self.warmup_programs, self.warmup_seconds = self.engine.warmup() if warmup else (0, 0.0)
        self.timings["warm-up"] = self.warmup_seconds
        if progress:
            print(f"[warm-up: {self.warmup_programs} programs in {self.warmup_seconds:.1f}s]" if warmup else
                  f"[no warm-up: up to {self.engine.programs()} programs compile as requests first need them]",
                  file=sys.stderr)
        self._next_id = 0

    def _load(self, checkpoint, config, progress: bool, quantization, fp8_impl):
        """Weights into the mesh: random ones (checkpoint None: load_format dummy), an Orbax
        checkpoint read straight into its shardings, or any other format streamed; then in the
        layout the backend's products prefer (projections.prefers_input_major)."""
        if checkpoint is None:
            model = random_weights(config, self.dtype, self.mesh, quantization=quantization, fp8_impl=fp8_impl)
        elif isinstance(checkpoint, OrbaxCheckpoint):
            model = checkpoint.restore(self.dtype, self.mesh, quantization, fp8_impl)
        else:
            model = load_weights(checkpoint, self.dtype, self.mesh, progress=progress, quantization=quantization,
                                 fp8_impl=fp8_impl)
        return model.to_input_major() if prefers_input_major() else model

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation_config defaults (generation_config='auto')."""
        return SamplingParams(**self.default_sampling)

    # ---- inputs ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _add(self, prompts, sampling_params) -> tuple[list[str], list[str | None], list[list[int]]]:
        """Validate every request first (nothing is queued if one is bad), then queue them all."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params: give one, or one each")
        texts, ids = zip(*(self._prompt_ids(p) for p in prompts)) if prompts else ((), ())
        matchers = []  # each request's grammar state (structured outputs), built here: a bad one queues nothing
        for i, (tokens, sp) in enumerate(zip(ids, params)):
            self.engine.check_request(tokens, sp, f"prompt {i}")
            matchers.append(self.engine.matcher(sp) if sp.structured_outputs is not None else None)
        request_ids = []
        for i, (tokens, sp, m) in enumerate(zip(ids, params, matchers)):
            request_ids.append(self.engine.add_request(tokens, sp, index=i, request_id=str(self._next_id), matcher=m))
            self._next_id += 1
        return request_ids, list(texts), list(ids)

    # ---- generation -----------------------------------------------------------------------

    def stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StepEvent]:
        """Yield StepEvents (request_id, index, token_id, text delta, logprobs, finished) per
        request as tokens come; `abort(request_id)` from the loop stops one request."""
        self._add(prompts, sampling_params)
        return self._run()

    def _run(self) -> Iterator[StepEvent]:
        """engine.run(), except that a step that raises first leaves the engine empty and
        consistent (Engine.abort_all: every request queued so far is dropped), so this LLM keeps
        working for later calls; then the error propagates. Only the step is guarded: a caller
        that stops iterating (closing the generator) leaves its requests queued, as before."""
        while self.engine.has_unfinished_requests():
            try:
                events = self.engine.step()
            except BaseException:  # KeyboardInterrupt too: a step cut short is as inconsistent
                self.engine.abort_all()
                raise
            yield from events

    def abort(self, request_id: str) -> bool:
        """Stop a running or queued request and free its KV pages at once."""
        return self.engine.abort_request(request_id)

    def prefix_cache_stats(self):
        """Prefix-cache hits so far: lookups, prompt_tokens, cached_tokens, hit_rate."""
        return self.engine.allocator.stats

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt through the engine together (continuous batching)."""
        request_ids, texts, ids = self._add(prompts, sampling_params)
        outs = {rid: CompletionOutput(0, "", [], None, [] if self.engine.sequences[rid].params.logprobs is not None
                                      else None, None) for rid in request_ids}
        prompt_lps: dict[str, list | None] = {}
        cached: dict[str, int] = {}
        for ev in self._run():
            if ev.request_id not in outs:
                continue  # a request queued by someone else (e.g. an unfinished stream)
            out = outs[ev.request_id]
            out.text += ev.text
            out.token_ids.append(ev.token_id)
            if ev.logprobs is not None:
                out.logprobs.append(ev.logprobs)
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + ev.logprobs[ev.token_id]
            if ev.prompt_logprobs is not None:
                prompt_lps[ev.request_id] = ev.prompt_logprobs
            if ev.finished:
                out.finish_reason = ev.finish_reason
                cached[ev.request_id] = ev.num_cached_tokens or 0
        return [RequestOutput(rid, text, tokens, prompt_lps.get(rid), [outs[rid]], num_cached_tokens=cached.get(rid, 0))
                for rid, text, tokens in zip(request_ids, texts, ids)]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the template comes from the
        tokenizer (mistral-common for Mistral models, the file's own template for GGUF)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.tokenizer.encode_chat(c, tools=tools)} for c in conversations]
        results = self.generate(prompts, sampling_params)
        for res in results:
            out = res.outputs[0]
            content, calls = self.tokenizer.parse_tool_calls(out.token_ids)
            if calls:
                out.text, out.tool_calls = content, calls
        return results
