"""OpenAI's Responses API request (POST /v1/responses), read as the chat request it amounts to.

A Responses request is a chat completion in other words: `instructions` is a system message;
`input` (a string, or items: messages, `function_call` items the model made and the
`function_call_output` items that answer them) is the conversation; function tools are flat
(`{"type": "function", "name", "parameters", ...}`); `text.format` is response_format;
`max_output_tokens` is max_completion_tokens. `chat_request` builds that ChatCompletionRequest, so
/v1/responses templates, samples and constrains exactly as /v1/chat/completions does (the same
greedy text for the same conversation).

Every refusal is a 400 naming the Responses field at fault (`input.2.content.0`, `tools.1.type`,
`text.format`), before any work. What this server cannot do is refused, never ignored where it
would change the answer: hosted tools (web search, file search, ...), images, files and audio in
the input, reasoning and item-reference items, `background`, server-side `conversation`s and
stored `prompt`s, truncation "auto", n > 1. What does not change the answer is accepted and
ignored (`include`, `reasoning`, `user`, `service_tier`, `prompt_cache_key`, ...)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.inputs import check_text
from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest, _Request

# The text of a message's content parts, by part type. refusal: an assistant's refusal, sent
# back as its text.
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
_ROLES = ("user", "assistant", "system", "developer")
# Sampling and vLLM's structured-output fields a Responses request passes to its chat request as
# they are (the request model bounds them alike: both are _Requests).
_PASSED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "logit_bias",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "structured_outputs",
           "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class ResponsesRequest(_Request):
    """The fields of OpenAI's Responses request that we serve, besides _Request's sampling fields
    (vLLM's extras included). Unknown fields are accepted and ignored, as on every route."""

    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # False: at most one call (with tool_choice required: exactly one)
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None  # ranges: request_params.py (SamplingParams, RequestLimits)
    previous_response_id: str | None = None
    store: bool | None = None  # not False: the response is kept for previous_response_id (responses.py)
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one response per request (_Request allows more for the other routes)

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, metadata):
        """OpenAI's bounds: at most 16 pairs, keys of at most 64 characters, values of 512."""
        if metadata is not None and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512
                                                               for k, v in metadata.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 characters and values of at most 512")
        return metadata


def refuse_unsupported(req: ResponsesRequest) -> None:
    """The request's features this server does not have, each a 400 naming its field."""
    if req.background:
        raise BadRequest("background responses are not served here: send background false (or leave it out) and "
                         "wait for the response, or stream it", "background")
    if req.conversation is not None:
        raise BadRequest("server-side conversations are not served here: chain responses with "
                         "previous_response_id, or send the whole conversation as input", "conversation")
    if req.prompt is not None:
        raise BadRequest("stored prompt templates are not served here: send the prompt's text as instructions "
                         "and input", "prompt")
    if req.truncation == "auto":
        raise BadRequest("truncation 'auto' (dropping the conversation's oldest items to fit the context) is not "
                         "served here: send truncation 'disabled', or a shorter input", "truncation")
    for field in ("input", "instructions", "tools", "text", "stop"):
        check_text(getattr(req, field), field)


def input_items(value) -> list[dict]:
    """The request's input as a list of items: a string is one user message."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def call_names(items: list[dict]) -> dict[str, str]:
    """call_id -> the function's name, of every function_call item (a tool message names its function
    where the template shows it)."""
    return {i["call_id"]: i["name"] for i in items if isinstance(i, dict) and i.get("type") == "function_call"
            and isinstance(i.get("call_id"), str) and isinstance(i.get("name"), str)}


def chat_messages_of(items: list[dict], names: dict[str, str], field: str = "input") -> list[dict]:
    """Responses items as OpenAI chat messages: a message item is a message of its role (its text
    parts joined); function_call items become the tool_calls of the assistant message before them
    (a new one where none is: one assistant turn writes text and calls alike); a
    function_call_output item is a tool message answering its call_id. A refused item is a 400
    naming `{field}.{index}` (and its part)."""
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"{field}.{i}"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object: a message, a function_call or a function_call_output item",
                             where)
        kind = item.get("type") or "message"  # OpenAI's "easy" input message has no type
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise BadRequest(f"{where}.role must be one of {_ROLES} (got {role!r})", f"{where}.role")
            out.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant":
                out[-1] = dict(out[-1], tool_calls=[*out[-1].get("tool_calls", []), call])
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            message = {"role": "tool", "tool_call_id": call_id,
                       "content": _text(item.get("output"), f"{where}.output")}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        else:
            raise BadRequest(f"{where} is a {kind!r} item, which this server does not take: send message, "
                             "function_call and function_call_output items", f"{where}.type")
    return out


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key} must be a string (got {type(value).__name__})", f"{where}.{key}")
    return value


def _text(content, where: str) -> str:
    """A message's content or a call's output: a string, or text parts (input_text, output_text,
    refusal) joined. Images, files and audio are refused: we serve text models."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of text parts", where)
    parts = []
    for j, part in enumerate(content):
        key = _TEXT_PARTS.get(part.get("type")) if isinstance(part, dict) else None
        if key is None or not isinstance(part.get(key), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRequest(f"{where}.{j} is a {kind!r} part: this server serves text models, so a part must be "
                             "{'type': 'input_text', 'text': ...} (or output_text, refusal)", f"{where}.{j}")
        parts.append(part[key])
    return "".join(parts)


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools as chat tools ({"type": "function", "function": {...}})."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise BadRequest(f"tools.{i} is a {kind!r} tool: this server runs no hosted tools; send function tools "
                             "({'type': 'function', 'name': ..., 'parameters': {...}})", f"tools.{i}.type")
        if not isinstance(tool.get("name"), str):
            raise BadRequest(f"tools.{i}.name must be the function's name, a string (Responses' function tools are "
                             "flat: name and parameters beside type, not under 'function')", f"tools.{i}.name")
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise BadRequest(f"tools.{i}.parameters must be a JSON schema (an object)", f"tools.{i}.parameters")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                          "strict") if tool.get(k) is not None}})
    return out


def chat_tool_choice(choice):
    """tool_choice in chat's words: "auto", "none", "required" as they are; {"type": "function",
    "name": n} as {"type": "function", "function": {"name": n}}."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"tool_choice {choice!r} is not one of 'auto', 'none', 'required' or "
                     "{'type': 'function', 'name': ...}", "tool_choice")


def response_format(text: dict | None) -> dict | None:
    """text.format as chat's response_format: text (none), json_object, or json_schema
    ({"type": "json_schema", "name", "schema", "strict"})."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest("text.format json_schema needs its schema: {'type': 'json_schema', 'name': ..., "
                             "'schema': {...}}", "text.format")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise BadRequest(f"text.format type {kind!r} is not one of 'text', 'json_object', 'json_schema'", "text.format")


def chat_request(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request a Responses request amounts to, over `messages` (the conversation, with
    any previous response's and the instructions)."""
    if not messages:
        raise BadRequest("input is empty: send a string or message items", "input")
    passed = {k: getattr(req, k) for k in _PASSED if k in req.model_fields_set}
    try:
        return ChatCompletionRequest(
            **passed, messages=messages, tools=chat_tools(req.tools), tool_choice=chat_tool_choice(req.tool_choice),
            parallel_tool_calls=req.parallel_tool_calls, response_format=response_format(req.text),
            max_completion_tokens=req.max_output_tokens, stream=req.stream)
    except ValidationError as e:  # the fields were checked by ResponsesRequest alike: not expected
        first = e.errors()[0]
        raise BadRequest(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# Chat's names of a Responses request's fields, as the chat path's refusals name them.
RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


def renamed(e: Exception) -> BadRequest:
    """A refusal of the chat path (BadRequest, ConstraintError) in the Responses request's words:
    its param, and the field names its message uses."""
    param = getattr(e, "param", None)
    message = getattr(e, "message", None) or str(e)
    for chat in ("max_completion_tokens", "response_format"):
        message = message.replace(chat, RENAMED[chat])
    if param is not None:  # a chat message's index is not the input item's: the field alone
        param = RENAMED.get(param.split(".")[0], param)
    return BadRequest(message, param, getattr(e, "status", 400), getattr(e, "type", "invalid_request_error"))
