"""`LLM`: the Python API, shaped like vLLM's offline `LLM` so users can switch in one line."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from .checkpoint import open_checkpoint
from .default_model import default_model_path
from .engine import Engine, Request, StepEvent
from .sampling import SamplingParams
from .sharding import make_mesh
from .tokenizer import ToolCall, load_tokenizer
from .weights import load_weights

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


class LLM:
    """Load a model and generate.

    model: a Mistral checkpoint directory (params.json + consolidated*.safetensors), a Hugging
    Face directory (config.json + model*.safetensors) or a .gguf file. None: the embedded demo
    model, SmolLM2-135M-Instruct (see README).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 32, tokenizer: str | None = None, progress: bool = True):
        enable_compilation_cache()
        self.model_path = str(model) if model is not None else default_model_path()
        self.dtype = resolve_dtype(dtype)
        checkpoint = open_checkpoint(self.model_path)
        self.config = checkpoint.config
        if max_model_len is not None and not 1 < max_model_len <= self.config.max_seq_len:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {self.config.max_seq_len}] "
                             "(the model's context)")
        self.max_model_len = max_model_len or self.config.max_seq_len
        self.tokenizer = load_tokenizer(tokenizer or self.model_path)
        self.mesh = make_mesh()
        t0 = time.perf_counter()
        model_ = load_weights(checkpoint, self.dtype, self.mesh, progress=progress)
        self.load_seconds = time.perf_counter() - t0
        self.engine = Engine(model_, self.tokenizer, self.mesh, self.max_model_len, max_num_seqs)
        self._next_id = 0

    def get_tokenizer(self):
        return self.tokenizer

    # ---- inputs ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        raise TypeError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _requests(self, prompts, sampling_params) -> tuple[list[Request], list[str | None]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params: give one, or one each")
        texts, reqs = [], []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            text, ids = self._prompt_ids(p)
            texts.append(text)
            reqs.append(Request(ids, sp, i))
        return reqs, texts

    # ---- generation -----------------------------------------------------------------------

    def stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StepEvent]:
        """Yield StepEvents (index, token_id, text delta, logprobs, finished) as tokens come."""
        reqs, _ = self._requests(prompts, sampling_params)
        return self.engine.stream(reqs)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        reqs, texts = self._requests(prompts, sampling_params)
        outs = [CompletionOutput(0, "", [], None, [] if r.params.logprobs is not None else None, None)
                for r in reqs]
        prompt_lps: list = [None] * len(reqs)
        for ev in self.engine.stream(reqs):
            out = outs[ev.index]
            out.text += ev.text
            out.token_ids.append(ev.token_id)
            if ev.logprobs is not None:
                out.logprobs.append(ev.logprobs)
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + ev.logprobs[ev.token_id]
            if ev.prompt_logprobs is not None:
                prompt_lps[ev.index] = ev.prompt_logprobs
            if ev.finished:
                out.finish_reason = ev.finish_reason
        results = []
        for r, text, out, plp in zip(reqs, texts, outs, prompt_lps):
            results.append(RequestOutput(str(self._next_id), text, r.prompt_token_ids, plp, [out]))
            self._next_id += 1
        return results

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
