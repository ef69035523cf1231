"""A request's sampling settings: OpenAI's fields -> SamplingParams, in one place.

One validation path for each value: the request models (protocol.py) parse types and bound what
nothing downstream bounds; SamplingParams checks every value's range; RequestLimits.check
(through the bridge) checks what depends on the model: max_tokens against the context and the
cache, stop_token_ids and logit_bias against the vocabulary. Their ValueErrors become 400s whose
param is the request's own field (chat's max_completion_tokens feeds SamplingParams.max_tokens, a
completion's logprobs its prompt_logprobs too)."""

from __future__ import annotations

import dataclasses
import re

from mistral_jax.entrypoints.server.bridge import EngineClient
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from mistral_jax.sample.sampling import SamplingParams

# Request fields passed to SamplingParams under their own names, when given; the model's
# generation_config (defaults) fills the ones a request leaves unset.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias")


def sampling_params(req, *, max_tokens, logprobs, prompt_logprobs=None, defaults: dict | None = None) -> SamplingParams:
    """OpenAI's fields -> SamplingParams (a bad value: a 400 naming its field and the fix).
    defaults: the model's generation_config values (vLLM's --generation-config auto), for fields
    the request leaves unset; max_tokens=None takes the default's, else the context's room."""
    given = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    given = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"} | given
    if max_tokens is None and (defaults or {}).get("max_tokens") is not None:
        max_tokens = defaults["max_tokens"]
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              ignore_eos=req.ignore_eos, **given)
    except ValueError as e:
        raise refusal(e, req) from e


def completion_params(req: CompletionRequest, defaults: dict) -> tuple[SamplingParams, bool]:
    """(the params of each choice, score_only). max_tokens=0 scores the prompt (echo with prompt
    logprobs, what evaluation harnesses send) and generates nothing: the engine runs one token,
    which the response leaves out."""
    score_only = req.max_tokens == 0
    if score_only and not req.echo:
        raise BadRequest("max_tokens=0 generates nothing: use it with echo=true (prompt logprobs), "
                         "or ask for at least 1 token", "max_tokens")
    # The request's default max_tokens (16) gives way to generation_config's, unless sent.
    max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set or not defaults.get("max_tokens") \
        else defaults["max_tokens"]
    params = sampling_params(req, max_tokens=1 if score_only else max_tokens, logprobs=req.logprobs,
                             defaults=defaults,
                             prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
    return params, score_only


def chat_params(req: ChatCompletionRequest, defaults: dict) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
    top = req.top_logprobs if req.logprobs else None
    return sampling_params(req, max_tokens=_chat_max_tokens(req), defaults=defaults,
                           logprobs=(top or 0) if req.logprobs else None)


def seeded(params: SamplingParams, c: int) -> SamplingParams:
    """The c-th of n choices: its own seed (a given seed plus c), so choices differ when sampling."""
    return params if params.seed is None or c == 0 else dataclasses.replace(params, seed=params.seed + c)


def admit(bridge: EngineClient, ids: list[int], params: SamplingParams, where: str, req) -> SamplingParams:
    """The engine's own check of a request (context, cache, vocabulary: RequestLimits.check) as a
    400; returns the params the engine runs (max_tokens and seed filled in)."""
    try:
        return bridge.check(ids, params, where)
    except ValueError as e:
        raise refusal(e, req) from e


# SamplingParams names the field as "SamplingParams.<field>"; RequestLimits names an over-long
# output as "max_tokens=<value>".
_NAMED_FIELD = re.compile(r"\bSamplingParams\.(\w+)|\b(max_tokens)=")


def refusal(e: ValueError, req) -> BadRequest:
    """A ValueError of SamplingParams or RequestLimits as a 400 whose param is the request's field
    that carried the value (None when the message names none: the prompt's own length, say)."""
    message = str(e)
    found = _NAMED_FIELD.search(message)
    if found is None:
        return BadRequest(message)
    field = found.group(1) or found.group(2)
    param = _request_field(req, field)
    return BadRequest(message if param == field else f"{param}: {message}", param)


def _chat_max_tokens(req: ChatCompletionRequest):
    # max_completion_tokens is OpenAI's newer name; given, it wins over max_tokens.
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def _request_field(req, field: str) -> str:
    """The request field behind SamplingParams' `field`."""
    if isinstance(req, ChatCompletionRequest):
        if field == "max_tokens" and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field == "logprobs":
            return "top_logprobs"
    if field == "prompt_logprobs":
        return "logprobs"
    return field
