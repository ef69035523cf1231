"""OpenAI's request and response bodies (the fields we serve), and its error object.

Requests are parsed here (types) and their sampling values bounded with SamplingParams' own
constants, so that bad input is a 400 naming the field before any tokenizing, and a body that
passes also builds a SamplingParams. max_tokens (chat's max_completion_tokens too) is the
exception: its bounds are the model's, so it has one validation path downstream, SamplingParams
(>= 1) then RequestLimits.check (within the context and the cache), whose errors
request_params.py turns into 400s naming the request's field. Integers may be of any size (JSON
has no limit; pydantic keeps Python ints): each one is either bounded here, or bounded by the
model where it is checked (max_tokens by the context, token ids and stop_token_ids by the
vocabulary: RequestLimits.check), or clipped where that is its meaning (a top_k past the
vocabulary is off)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mistral_jax.sample.sampling import (
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
)

MAX_N = 16  # choices per request: each is a job of its own in the engine
_TokenId = Annotated[int, Field(ge=0)]  # the upper bound is the vocabulary's (RequestLimits.check)


class _Request(BaseModel):
    # Unknown fields are accepted and ignored (clients send `user`, `metadata`, ...); NaN and
    # infinities are refused.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # no upper bound: one >= the vocabulary means off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # int64 or uint64; the sampler takes it modulo 2**64
    stop: str | list[str] | None = None  # bounded by _bounded_stop
    stop_token_ids: list[_TokenId] | None = None
    # OpenAI's {token id: bias}: JSON keys are strings; ids, their count and the biases' range are
    # checked once, by SamplingParams (and the vocabulary by RequestLimits.check)
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    # vLLM's structured-output fields: the object, and the older guided_* names
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop):
        """SamplingParams' bounds on stop strings, as one error on `stop` (Field bounds inside
        the str | list union would report a failure per branch, the wrong one first)."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters "
                             f"each (got {len(stops)}, the longest {max(map(len, stops))} characters)")
        return stop


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # 0: score the prompt (with echo); ranges: request_params.py
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None  # ranges: request_params.py (SamplingParams, RequestLimits)
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens: given, it wins
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # False: at most one call (with tool_choice required: exactly one)
    # OpenAI's deprecated names of tools and tool_choice: inputs.with_legacy_functions maps them
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error"]


def error_body(message: str, type_: ErrorType = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
