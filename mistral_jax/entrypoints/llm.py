"""`LLM`: the Python API, shaped like vLLM's offline `LLM` so users can switch in one line."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from mistral_jax.engine.args import EngineArgs
from mistral_jax.engine.build import build, resolve_dtype  # noqa: F401  (resolve_dtype: re-exported for benchmarks)
from mistral_jax.engine.outputs import StepEvent
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tool_calls import ToolCall, tool_call_format


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


class LLM:
    """Load a model and generate: vLLM's offline API on top of build() (engine/build.py).

    LLM(model, **settings): the settings are EngineArgs' fields, by keyword, with vLLM's names
    and meaning (mistral_jax/engine/args.py and the README's settings table list them all), e.g.
    LLM(model="mistralai/Mistral-Small-24B-Instruct-2501", tokenizer_mode="mistral",
    tensor_parallel_size=2, quantization="fp8"). A name that is no setting is a TypeError naming
    the nearest one. progress: print the start-up report (only process 0 of a multi-host run
    prints). `LLM.from_engine_args(args)` takes an EngineArgs already built (the CLI's).

    What build() made is kept as attributes: engine, tokenizer, config (the model's), mesh,
    dtype, quantization, model_path, tokenizer_source, max_model_len, default_sampling, timings
    (seconds per start-up stage), load_seconds, warmup_programs, warmup_seconds; args holds the
    settings. `llm.engine.speculator.stats` counts speculative proposals and acceptances.
    """

    def __init__(self, model: str | None = None, *, progress: bool = True, **settings):
        self._start(EngineArgs.from_kwargs(model=model, **settings), progress)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, progress: bool = True) -> LLM:
        llm = cls.__new__(cls)
        llm._start(args, progress)
        return llm

    def _start(self, args: EngineArgs, progress: bool) -> None:
        built = build(args, progress)
        self.args = args
        self.engine, self.tokenizer, self.config, self.mesh = built.engine, built.tokenizer, built.config, built.mesh
        self.dtype, self.quantization = built.dtype, built.quantization
        self.model_path, self.tokenizer_source, self.tokenizer_mode = (built.model_path, built.tokenizer_source,
                                                                       args.tokenizer_mode)
        self.max_model_len, self.default_sampling = built.max_model_len, built.default_sampling
        self.timings, self.load_seconds = built.timings, built.load_seconds
        self.warmup_programs, self.warmup_seconds = built.warmup_programs, built.warmup_seconds
        self._next_id = 0

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
            # A call cut off by max_tokens is not text: the text is what came before the calls.
            reply = tool_call_format(self.tokenizer).read(out.token_ids, out.text,
                                                          cut_off=out.finish_reason == "length")
            if reply.begun:
                out.text, out.tool_calls = reply.content, reply.calls
        return results
