"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): its request bodies (the
fields we serve), its error object, and the paths that speak it.

The request models parse types and bound what nothing downstream bounds, as protocol.py does for
OpenAI's: Anthropic's own ranges where they are narrower than ours (temperature in [0, 1]), the
stop-sequence limits of SamplingParams. Content blocks stay dicts here: messages.py checks them,
naming each bad one by its path (`messages.0.content.1`), and turns the request into a chat
completion's. Unknown fields are accepted and ignored (clients send `metadata`, `thinking`,
`cache_control`, `service_tier`, ...)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mistral_jax.sample.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS

# The paths whose errors are Anthropic's error object (errors.py) and which take Anthropic's
# `x-api-key` header as the API key (guard.py).
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


class CountTokensRequest(BaseModel):
    """What a prompt is made of: /v1/messages/count_tokens' body, and the first half of a
    message request's."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int  # required, as in Anthropic's API; ranges: SamplingParams, then RequestLimits
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # 0 is off; one past the vocabulary is off too
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted (Anthropic's user_id); nothing here reads it
    output_config: dict[str, Any] | None = None  # its `format`: a JSON schema the reply must match

    @field_validator("stop_sequences")
    @classmethod
    def _bounded_stops(cls, stops):
        """SamplingParams' bounds on stop strings, as one error on `stop_sequences`."""
        if stops and (len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops)):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences of at most {MAX_STOP_LENGTH} characters "
                             f"each (got {len(stops)}, the longest {max(map(len, stops))} characters)")
        return stops


AnthropicErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "api_error"]


def anthropic_error_type(status: int, openai_type: str) -> AnthropicErrorType:
    """Anthropic's error type for an error the server would give as OpenAI's: a 5xx is an
    api_error (OpenAI's server_error); 401 and 404 keep their kind; any other 4xx is the
    client's request (a 413's body too: the anthropic client knows no request_too_large)."""
    if status >= 500 or openai_type == "server_error":
        return "api_error"
    if openai_type in ("authentication_error", "not_found_error"):
        return openai_type  # type: ignore[return-value]
    return "invalid_request_error"


def anthropic_error_body(status: int, message: str, param: str | None, openai_type: str) -> dict:
    """Anthropic's error object. It has no `param`: the message names the field instead (it is
    put first where the message does not start with it)."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": anthropic_error_type(status, openai_type), "message": message}}


class AnthropicErrorObject(BaseModel):
    type: AnthropicErrorType
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error object, as /v1/messages' errors carry it (the OpenAPI document's schema)."""

    type: Literal["error"]
    error: AnthropicErrorObject
