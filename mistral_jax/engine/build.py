"""EngineArgs -> a running engine: `build(args)` joins the other processes of a multi-host run,
opens the model (a local checkpoint, a Hub repo, or random weights of a real shape), loads its
tokenizer and weights into the mesh, starts the Engine and warms it up, printing the start-up
report and timing each stage. Every front door builds its engine here: `LLM` (and through it the
`generate` command) and the server's engine process.

EngineArgs has already checked every setting on its own; what needs the model or the devices is
checked here, before the slow weight load: the mesh against the visible devices and the model's
heads, max_model_len against the model's context.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mistral_jax.config import ModelConfig
from mistral_jax.engine.args import DTYPE_NAMES, EngineArgs
from mistral_jax.engine.engine import Engine, EngineConfig
from mistral_jax.loading import hub
from mistral_jax.loading.checkpoint import open_checkpoint
from mistral_jax.loading.default_model import default_model_path
from mistral_jax.loading.weights import load_model
from mistral_jax.model.kernels import choose_kernels
from mistral_jax.runtime import distributed
from mistral_jax.runtime.sharding import check_mesh, parse_mesh
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import Tokenizer, load_tokenizer

DTYPES = {name: getattr(jnp, canonical) for name, canonical in DTYPE_NAMES.items()}


@dataclasses.dataclass
class BuiltEngine:
    """What build() made, and what the front doors report of it."""

    args: EngineArgs
    engine: Engine
    tokenizer: Tokenizer
    config: ModelConfig  # the model's
    mesh: Mesh
    dtype: jnp.dtype  # of the 16/32-bit weights
    quantization: str | None  # the weights' ("fp8" for an FP8 checkpoint even when args asked for None)
    model_path: str  # the local folder or file read (a Hub repo's cache folder)
    tokenizer_source: str  # load_tokenizer's input: a file, a directory or a GGUF file
    max_model_len: int
    default_sampling: dict  # generation_config's defaults for the fields a request leaves unset
    timings: dict[str, float]  # seconds of each start-up stage (generate --verbose)
    warmup_programs: int  # programs compiled by the warm-up (0 without one)
    warmup_seconds: float

    @property
    def load_seconds(self) -> float:
        """The weight load: checkpoint -> device arrays."""
        return self.timings["weights"]


def build(args: EngineArgs, progress: bool = True, platform: str | None = None) -> BuiltEngine:
    """Build the engine that args describe. progress: print the start-up report (process 0 only).
    platform: the platform its programs are made for, kernels and token buckets included (None: the
    mesh devices'). Another one ("tpu" on a CPU-only machine) makes an engine whose programs are
    lowered for that platform and never run there (tests/test_tpu_lowering.py); it warms up only
    when asked."""
    join_processes(args)  # before anything else touches JAX
    progress = progress and distributed.is_main_process()
    mesh = parse_mesh(tensor_parallel_mesh(args.mesh, args.tensor_parallel_size))  # fails before anything opens
    enable_compilation_cache()
    dtype = resolve_dtype(args.dtype)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    fetch = dict(config_format=args.config_format, tokenizer_mode=args.tokenizer_mode, revision=args.revision,
                 download_dir=args.download_dir)
    if args.load_format == "dummy":  # random weights of a real shape (dummy.py)
        from mistral_jax.loading.dummy import dummy_config, dummy_tokenizer

        spec = args.config or args.model
        if hub.is_repo_id(str(spec)):  # a Hub repo: its config and tokenizer only
            spec = str(hub.resolve_model(str(spec), load_format="dummy", weights=False, **fetch).path)
        model_path, checkpoint = str(spec), None
        config = dummy_config(spec)
        tokenizer = args.tokenizer or dummy_tokenizer(spec, config)
    else:
        resolved = hub.resolve_model(str(args.model) if args.model is not None else default_model_path(),
                                     load_format=args.load_format, **fetch)
        model_path = str(resolved.path)
        checkpoint = open_checkpoint(resolved.path, resolved.layout)
        config = checkpoint.config
        tokenizer = args.tokenizer
    if args.max_model_len is not None and not args.max_model_len <= config.max_seq_len:
        raise ValueError(f"max_model_len={args.max_model_len} must be in [2, {config.max_seq_len}] "
                         "(the model's context)")
    max_model_len = args.max_model_len or config.max_seq_len
    engine_config = EngineConfig(
        max_model_len, block_size=args.block_size, num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        attention_impl=args.attention_impl, speculative_config=args.speculative_config, seed=args.seed)
    check_mesh(config, mesh)
    timings["open checkpoint (config, tensor index)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if tokenizer is not None and hub.is_repo_id(str(tokenizer)):  # vLLM's tokenizer= may name a Hub repo too
        tokenizer = str(hub.resolve_model(str(tokenizer), load_format="dummy", weights=False, **fetch).path)
    tokenizer_source = str(tokenizer or model_path)
    tokenizer = load_tokenizer(tokenizer_source, args.tokenizer_mode)
    default_sampling = generation_defaults(args.generation_config, model_path)
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    platform = platform or mesh.devices.flat[0].platform
    kernels = choose_kernels(platform, attention=args.attention_impl, fp8=args.fp8_impl)
    model = load_model(checkpoint, config, dtype, mesh, progress=progress, quantization=args.quantization,
                       kernels=kernels)
    timings["weights"] = time.perf_counter() - t0
    draft = None
    spec = engine_config.speculative_config
    if spec is not None and spec.method == "draft_model":
        t0 = time.perf_counter()
        draft_checkpoint = open_checkpoint(spec.model)
        check_mesh(draft_checkpoint.config, mesh)
        draft = load_model(draft_checkpoint, draft_checkpoint.config, dtype, mesh, progress=progress, kernels=kernels)
        timings["draft model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    engine = Engine(model, tokenizer, mesh, engine_config, draft=draft, kernels=kernels)
    timings["engine (KV cache)"] = time.perf_counter() - t0
    if progress:
        weights = (f"weights fp8 (e4m3 per-channel, per-token dynamic activations, fp8_matmul "
                   f"{kernels.describe_fp8()})" if model.quantization == "fp8"
                   else f"weights {jnp.dtype(dtype).name}")
        print(f"[{weights}; {engine.describe_cache()}]", file=sys.stderr)
    warmup = args.warmup
    if warmup is None:  # an accelerator: a request must never wait on a compile; a CPU: start fast
        warmup = platform == mesh.devices.flat[0].platform != "cpu"
    warmup_programs, warmup_seconds = engine.warmup() if warmup else (0, 0.0)
    timings["warm-up"] = warmup_seconds
    if progress:
        print(f"[warm-up: {warmup_programs} programs in {warmup_seconds:.1f}s]" if warmup else
              f"[no warm-up: up to {engine.programs()} programs compile as requests first need them]",
              file=sys.stderr)
    return BuiltEngine(args, engine, tokenizer, config, mesh, dtype, model.quantization, model_path,
                       tokenizer_source, max_model_len, default_sampling, timings, warmup_programs, warmup_seconds)


def join_processes(args: EngineArgs) -> bool:
    """Multi-host: join the other processes before JAX starts (distributed.py; the environment's
    JAX_COORDINATOR_ADDRESS etc. work too). Returns whether this run has several processes;
    calling it again is a no-op."""
    return distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed, timeout_s=args.distributed_timeout)


def resolve_dtype(dtype) -> jnp.dtype:
    """"auto": bf16 on accelerators; f32 on CPU, where bf16 matmuls are emulated and slow."""
    if dtype in (None, "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):  # a name EngineArgs accepted
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def tensor_parallel_mesh(mesh, tensor_parallel_size: int | None):
    """vLLM's tensor_parallel_size as this engine's mesh: tp=N (alone, or the same as mesh's tp)."""
    if tensor_parallel_size is None:
        return mesh
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


def enable_compilation_cache() -> None:
    """Keep compiled programs across restarts (JAX's persistent cache), unless the user chose."""
    if jax.config.jax_compilation_cache_dir is None:
        path = os.environ.get("MISTRAL_JAX_CACHE_DIR", str(Path.home() / ".cache" / "mistral_jax" / "xla"))
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX keeps only programs that took >= 1 s to compile by default; the many small ones
        # (sampling tails, the penalty reset, short buckets) would then recompile at every start.
        if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default: not the user's choice
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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
