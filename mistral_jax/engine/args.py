"""The engine's settings: `EngineArgs`, the one list of them (vLLM's names).

Every front door derives from its fields: `LLM(**kwargs)` is `EngineArgs(**kwargs)`, the
command-line flags of `generate` and `serve` are generated from them (`add_cli_args`, one flag
per field, spelled and explained by the field's metadata), and so is the README's settings table
(`settings_table`; `python -m mistral_jax.engine.args` prints it, tests/test_engine_args.py keeps
the README equal to it).

An EngineArgs is checked once, when it is built (`__post_init__`): every value that can be judged
without the model or the devices. What needs them (max_model_len against the model's context, a
mesh against the visible devices) is checked by build.py, which turns EngineArgs into an engine.
Every error names the setting, the value and the fix.

Importing this module imports no JAX: the server's HTTP processes parse flags with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import TYPE_CHECKING

from mistral_jax.loading import hub
from mistral_jax.model.kernels import ATTENTION_IMPLS, FP8_IMPLS

if TYPE_CHECKING:  # annotations only: importing them would import JAX
    from jax.sharding import Mesh

    from mistral_jax.engine.speculative import SpeculativeConfig

# dtype's names -> the dtype they mean (build.resolve_dtype maps them to JAX's).
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32",
               "float16": "float16", "fp16": "float16"}
# mistral_jax.model.transformer.QUANTIZATIONS (a JAX module; tests/test_engine_args.py checks they agree).
QUANTIZATIONS = (None, "fp8")
# mistral_jax.runtime.distributed.DEFAULT_TIMEOUT_S (a JAX module; the test checks they agree).
DISTRIBUTED_TIMEOUT_S = 300.0

MODEL_GROUP = None  # flags at the top of --help
ENGINE_GROUP = "engine (vLLM's names)"
DISTRIBUTED_GROUP = "multi-process (one process per host; see README)"


def setting(default, help: str, *, aliases: tuple[str, ...] = (), choices=None, default_text: str | None = None,
            action: str | None = None, group: str | None = ENGINE_GROUP):
    """A field of EngineArgs with what its flag and its README row need. The flag is --name-with-
    dashes (plus aliases, e.g. vLLM's -tp); choices: the values the flag accepts; default_text:
    the default as the README and --help say it, where the value alone would not explain it."""
    return dataclasses.field(default=default, metadata=dict(help=help, aliases=aliases, choices=choices,
                                                            default_text=default_text, action=action,
                                                            group=group))


@dataclasses.dataclass
class EngineArgs:
    """Every engine setting, with vLLM's names, meaning and defaults. Each field's metadata
    (setting()) holds its help text and flag spelling; building one checks it (__post_init__)."""

    # ---- the model and where it comes from ---------------------------------------------------
    model: str | None = setting(
        None, "a Hugging Face Hub repo id (e.g. mistralai/Mistral-Small-24B-Instruct-2501: fetched into "
              "huggingface_hub's cache or download_dir; HF_TOKEN and HF_HUB_OFFLINE apply), a Mistral "
              "(params.json) or Hugging Face (config.json) checkpoint directory, a .gguf file, or an Orbax "
              "checkpoint (python -m mistral_jax.convert)",
        default_text="the embedded demo model, SmolLM2-135M-Instruct", group=MODEL_GROUP)
    dtype: str = setting(
        "auto", "auto (bf16 on GPU/TPU, f32 on CPU, where bf16 matmuls are emulated), bfloat16, float32, "
                "float16 (or bf16, f32, fp16)", group=MODEL_GROUP)
    quantization: str | None = setting(
        None, "fp8: quantize a 16/32-bit checkpoint's layer projections at load (e4m3, one scale per output "
              "channel; activations quantized per token at run time, W8A8). FP8 checkpoints (compressed-tensors "
              "'FP8 dynamic') load as FP8 without it. Embeddings and the output head stay 16/32-bit",
        choices=tuple(q for q in QUANTIZATIONS if q is not None), group=MODEL_GROUP)
    mesh: str | Mesh | None = setting(
        None, "devices to split the model over, e.g. tp=4 or dp=2,tp=4 (or a jax.sharding.Mesh in Python)",
        default_text="one device", group=MODEL_GROUP)
    tensor_parallel_size: int | None = setting(
        None, "vLLM's name for mesh tp=N", aliases=("-tp",), group=MODEL_GROUP)
    max_model_len: int | None = setting(
        None, "context length to serve", default_text="the model's", group=MODEL_GROUP)
    load_format: str = setting(
        "auto", "the weights to read (vLLM's): mistral (consolidated*.safetensors), safetensors (Hugging Face "
                "shards), gguf, auto (the layout config_format names, else Hugging Face's, Mistral's, GGUF); "
                "dummy: random weights of the shape config names (benchmarks without a checkpoint)",
        choices=hub.LOAD_FORMATS, group=MODEL_GROUP)
    config_format: str = setting(
        "auto", "mistral (params.json), hf (config.json), auto (config.json if present, else params.json)",
        choices=hub.CONFIG_FORMATS, group=MODEL_GROUP)
    tokenizer_mode: str = setting(
        "auto", "mistral (mistral-common: tekken.json / tokenizer.model.v*), hf (tokenizer.json), auto "
                "(Mistral's files when the model has them)", choices=hub.TOKENIZER_MODES, group=MODEL_GROUP)
    revision: str | None = setting(
        None, "a Hub repo's branch, tag or commit", default_text="main", group=MODEL_GROUP)
    download_dir: str | None = setting(
        None, "where Hub downloads go", default_text="huggingface_hub's cache, $HF_HOME", group=MODEL_GROUP)
    generation_config: str = setting(
        "auto", "auto: the model's generation_config.json sampling fields (temperature, top_p, top_k, min_p, "
                "repetition_penalty, max_new_tokens) are the defaults of requests that leave them unset and of "
                "get_default_sampling_params(); vllm: none; or a folder holding generation_config.json",
        group=MODEL_GROUP)
    config: str | None = setting(
        None, "with load_format dummy: a config in configs/ (e.g. mistral-small-2501), a directory holding "
              "params.json or config.json, or a Hub repo id", group=MODEL_GROUP)
    tokenizer: str | None = setting(
        None, "a tokenizer file, directory or Hub repo id", default_text="the model's", group=MODEL_GROUP)

    # ---- the engine ---------------------------------------------------------------------------
    block_size: int = setting(16, "tokens per KV cache page")
    num_pages: int | None = setting(
        None, "KV cache pages, instead of sizing them with gpu_memory_utilization",
        default_text="from memory (CPU: enough for max_num_seqs full sequences, up to 1 GiB)")
    gpu_memory_utilization: float = setting(
        0.9, "fraction of device memory for weights + KV cache (pages are sized from what is left)")
    max_num_seqs: int = setting(256, "sequences per step")
    max_num_batched_tokens: int = setting(
        2048, "tokens per step; longer prompts are prefilled in chunks between other requests' decode steps")
    enable_prefix_caching: bool = setting(
        True, "reuse the KV pages of repeated prompt prefixes: full pages are named by a hash chained over "
              "their tokens, and a request reuses the pages of its longest cached prefix "
              "(llm.prefix_cache_stats() and RequestOutput.num_cached_tokens report hits)")
    attention_impl: str = setting(
        "auto", "ragged paged attention: the Pallas kernel of the backend (auto), one by name, or the plain-jnp "
                "reference", choices=ATTENTION_IMPLS)
    fp8_impl: str = setting(
        "auto", "FP8 matmul (with quantization fp8 or an FP8 checkpoint): auto picks by backend and tokens per "
                "step (GPU: the Triton kernel for small decode steps, the Mosaic GPU wgmma kernel for larger ones "
                "and prefill; the log names the thresholds)", choices=FP8_IMPLS)
    warmup: bool | None = setting(
        None, "compile every program the settings allow before the first request, so that no request waits "
              "on a compile, prefix-cache hits included (off: programs compile as requests first need them; "
              "the persistent compilation cache makes a restart's warm-up a fraction of the first)",
        default_text="on with an accelerator, off on a CPU; serve: always on")
    speculative_config: dict | str | SpeculativeConfig | None = setting(
        None, "speculative decoding: vLLM's dict (on the command line its JSON), e.g. "
              "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' or {\"method\": \"draft_model\", "
              "\"model\": PATH, \"num_speculative_tokens\": 4}: the same output, more tokens per step where "
              "the text repeats its context (a draft model must share the model's vocabulary)")
    seed: int | None = setting(
        0, "vLLM's: requests that set no seed draw theirs from one generator started with it, so a run "
           "repeats itself (None: fresh each run). generate's own --seed is one request's")

    # ---- multi-process: one process per host, all running the same program --------------------
    coordinator_address: str | None = setting(
        None, "host:port of process 0 (env JAX_COORDINATOR_ADDRESS)", group=DISTRIBUTED_GROUP)
    num_processes: int | None = setting(
        None, "processes in the run (env JAX_NUM_PROCESSES)", group=DISTRIBUTED_GROUP)
    process_id: int | None = setting(
        None, "this process, 0 .. N-1 (env JAX_PROCESS_ID); only process 0 prints", group=DISTRIBUTED_GROUP)
    distributed: bool = setting(
        False, "let JAX detect the cluster (Cloud TPU pods, Slurm, Open MPI): no other multi-process setting "
               "needed", action="store_true", group=DISTRIBUTED_GROUP)
    distributed_timeout: float = setting(
        DISTRIBUTED_TIMEOUT_S, "seconds to wait for the other processes before failing", group=DISTRIBUTED_GROUP)

    def __post_init__(self):
        for name, value, allowed in (("attention_impl", self.attention_impl, ATTENTION_IMPLS),
                                     ("fp8_impl", self.fp8_impl, FP8_IMPLS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is not supported; use None (the checkpoint's "
                             "own weights) or 'fp8' (e4m3 projections, per-channel scales, quantized at load)")
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of 'auto', {sorted(DTYPE_NAMES)}")
        hub.check_formats(self.load_format, self.config_format, self.tokenizer_mode)
        if self.load_format == "dummy" and self.config is None and self.model is None:
            raise ValueError("load_format='dummy' needs config= (e.g. 'mistral-small-2501') or a model directory "
                             "holding params.json")
        tp = self.tensor_parallel_size
        if tp is not None and (not _is_int(tp) or tp < 1):
            raise ValueError(f"tensor_parallel_size={tp!r}: give an integer >= 1")
        if not (self.max_model_len is None or self.max_model_len >= 2):
            raise ValueError(f"max_model_len={self.max_model_len!r} is invalid: use None (the model's context) "
                             "or an integer >= 2")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout={self.distributed_timeout!r} is invalid: use a number of "
                             "seconds > 0, e.g. 300")
        check_serving_ranges(self)
        # Parsed once here (JSON text from the command line, or vLLM's dict): a bad key or value
        # fails before anything is loaded, and the engine receives the parsed config.
        from mistral_jax.engine.speculative import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        """EngineArgs(**kwargs), but a name that is no setting is an error that names the nearest one
        (LLM(**kwargs) goes through here)."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise TypeError(f"{key!r} is not an engine setting: {hint}The settings are EngineArgs' fields "
                                f"(mistral_jax/engine/args.py, the README's settings table): {', '.join(names)}")
        return cls(**kwargs)

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> EngineArgs:
        """The settings among add_cli_args' parsed flags (a field a front door left out keeps its default)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                      if hasattr(namespace, f.name)})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

def check_serving_ranges(settings) -> None:
    """The ranges of the serving settings that EngineArgs and the engine's EngineConfig share (one
    list, so the two cannot drift): a ValueError naming the setting and what to use."""
    s = settings
    checks = [
        ("block_size", s.block_size, 1 <= s.block_size <= 1024, "an integer in [1, 1024], e.g. 16"),
        ("max_num_seqs", s.max_num_seqs, s.max_num_seqs >= 1, "an integer >= 1"),
        ("max_num_batched_tokens", s.max_num_batched_tokens, s.max_num_batched_tokens >= 1,
         "an integer >= 1 (e.g. 2048)"),
        ("gpu_memory_utilization", s.gpu_memory_utilization, 0 < s.gpu_memory_utilization <= 1,
         "a fraction in (0, 1], e.g. 0.9"),
        ("num_pages", s.num_pages, s.num_pages is None or s.num_pages >= 2,
         "None (size from memory) or an integer >= 2"),
        ("seed", s.seed, s.seed is None or (_is_int(s.seed) and s.seed >= 0),
         "None (fresh each run) or an integer >= 0"),
    ]
    for name, value, ok, fix in checks:
        if not ok:
            raise ValueError(f"{name}={value!r} is invalid: use {fix}")



# ---- the command line ----------------------------------------------------------------------------

def flags(field: dataclasses.Field) -> list[str]:
    """A setting's flags: vLLM's aliases, then --name-with-dashes."""
    return [*field.metadata["aliases"], "--" + field.name.replace("_", "-")]


def _flag_type(field: dataclasses.Field):
    """The flag's value type, from the field's annotation (a string, never evaluated): int and
    float fields parse as such, the rest stay text."""
    first = field.type.split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def add_cli_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per EngineArgs field (except those named in exclude), with the field's name as its
    dest: `EngineArgs.from_cli_args(parser.parse_args())` reads them back."""
    groups = {MODEL_GROUP: parser}
    for field in dataclasses.fields(EngineArgs):
        if field.name in exclude:
            continue
        meta = field.metadata
        group = meta["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        help = meta["help"] + (f" (default: {meta['default_text']})" if meta["default_text"] else "")
        kwargs = dict(dest=field.name, default=field.default, help=help)
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
        elif field.type.startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction  # --enable-prefix-caching / --no-enable-prefix-caching
        else:
            kwargs["type"] = _flag_type(field)
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        groups[group].add_argument(*flags(field), **kwargs)


def normalize_flags(argv: list[str]) -> list[str]:
    """vLLM accepts --flag_name and --flag-name alike (its model cards write --tokenizer_mode): the
    underscores of a long flag's name become dashes (never those of its value)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


# ---- the README ----------------------------------------------------------------------------------

README_BEGIN = "<!-- settings table: generated from EngineArgs by `python -m mistral_jax.engine.args` -->"
README_END = "<!-- end of the settings table -->"


def settings_table() -> str:
    """The README's settings table: one row per EngineArgs field (between README_BEGIN and README_END)."""
    rows = ["| setting | flag | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(EngineArgs):
        meta = field.metadata
        if field.type.startswith("bool") and meta["action"] is None:
            shown = " / ".join(f"`{f}`" for f in flags(field)) + f" / `--no-{field.name.replace('_', '-')}`"
        else:
            shown = " / ".join(f"`{f}`" for f in flags(field))
        default = meta["default_text"] or _default_text(field.default)
        meaning = meta["help"]
        if meta["choices"] is not None:
            meaning += "; one of " + ", ".join(f"`{c}`" for c in meta["choices"])
        meaning = meaning.replace("|", "&#124;").replace("*", "\\*")  # a table cell: no column break, no emphasis
        rows.append(f"| `{field.name}` | {shown} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value!r}`" if isinstance(value, str) or value is None else f"{value:g}"


if __name__ == "__main__":
    sys.stdout.write(settings_table())
