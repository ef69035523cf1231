"""A request's prompt as the tokenizer takes it: text checked, completion prompts (text or token
ids) and chat messages (roles, text parts, tool-call ids) made ready, and the tools a chat
template sees (OpenAI's deprecated `functions` and `function_call` read as tools and
tool_choice). Every refusal is a 400 naming the request's field."""

from __future__ import annotations

import hashlib
import re
import string

import numpy as np
from fastapi import Request

from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest
from mistral_jax.entrypoints.server.tokenizing import INLINE_BODY_BYTES, Tokenizing

_SURROGATE = re.compile("[\ud800-\udfff]")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def is_big(request: Request) -> bool:
    """Whether the request's body is large enough to be tokenized off the event loop (guard.py
    records its size)."""
    return getattr(request.state, "body_bytes", 0) > INLINE_BODY_BYTES


def check_text(value, field: str) -> None:
    """Text that cannot be UTF-8 (a lone surrogate such as JSON's "\\ud800", which JSON parsers
    pass through) is the client's error, named by its field: no tokenizer could encode it."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            raise BadRequest(f"{field} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text: "
                             "send valid Unicode (pair surrogates, or drop them)", field.split(".")[0])
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, field)
            check_text(v, f"{field}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{field}.{i}")


async def completion_prompts(tokenizing: Tokenizing, prompt, big: bool) -> list[tuple[str | None, list[int]]]:
    """/v1/completions' prompt (a string, strings, token ids, or lists of them) as (text or None,
    ids) per prompt. Ids of a big body come back as an int32 array (tokenizing.py)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):  # token ids (the request model allows no mixed list)
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt is empty: send a string, a list of strings, or token ids", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, await tokenizing.encode(p, add_bos=True, big=big)))
        else:
            out.append((None, list(p)))
    return out


def chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped messages checked and made ready for the chat template."""
    messages = _legacy_function_messages(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {CHAT_ROLES}", f"messages.{i}.role")
        if m.get("content") is not None and not isinstance(m.get("content"), (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages.{i}.content")
    check_text(messages, "messages")
    return [_text_content(m) for m in _mistral_tool_ids(messages)]


async def templated(work):
    """A template's or tokenizer's refusal of the client's input is a 400 naming it."""
    try:
        return await work
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001  mistral-common / the template said no: the client's input
        raise BadRequest(f"the conversation cannot be templated: {type(e).__name__}: {e}", "messages") from e


def with_legacy_functions(req: ChatCompletionRequest) -> ChatCompletionRequest:
    """A request in OpenAI's deprecated function-calling fields, read as its tools: `functions`
    (function definitions) becomes tools of type "function", and `function_call` ("none",
    "auto", {"name": ...}) the matching tool_choice. The legacy fields stay set on the copy, so
    the response can answer in their shape. Either one beside its newer name is a 400: which of
    the two was meant is not for us to guess."""
    if req.functions is None and req.function_call is None:
        return req
    update = {}
    if req.functions is not None:
        if req.tools is not None:
            raise BadRequest("functions is the deprecated form of tools: send one of them, not both", "functions")
        if not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in req.functions):
            raise BadRequest("functions must be function definitions, each {'name': ..., 'parameters': {...}}",
                             "functions")
        update["tools"] = [{"type": "function", "function": f} for f in req.functions]
    if req.function_call is not None:
        if req.tool_choice is not None:
            raise BadRequest("function_call is the deprecated form of tool_choice: send one of them, not both",
                             "function_call")
        call = req.function_call
        if call in ("none", "auto"):
            update["tool_choice"] = call
        elif isinstance(call, dict) and isinstance(call.get("name"), str):
            update["tool_choice"] = {"type": "function", "function": {"name": call["name"]}}
        else:
            raise BadRequest(f"function_call {call!r} is not one of 'none', 'auto' or {{'name': ...}}",
                             "function_call")
    return req.model_copy(update=update)


def as_legacy_function_call(message: dict, finish_reason: str | None) -> tuple[dict, str | None]:
    """A whole reply to a request made with `functions`, in that API's shape: its tool call as
    message.function_call ({name, arguments}) and finish_reason "function_call". The legacy API
    made one call per reply: any after the first are dropped."""
    calls = message.get("tool_calls")
    if not calls:
        return message, finish_reason
    legacy = {k: v for k, v in message.items() if k != "tool_calls"}
    legacy["function_call"] = {"name": calls[0]["function"]["name"], "arguments": calls[0]["function"]["arguments"]}
    return legacy, "function_call" if finish_reason == "tool_calls" else finish_reason


def request_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template shows the model, after checking tool_choice against them.
    A call that tool_choice requires is enforced by a grammar (constraints.py), not here."""
    choice = req.tool_choice
    if choice in (None, "auto"):
        return req.tools or None
    if choice == "none":
        return None
    if not req.tools:
        raise BadRequest("tool_choice needs tools: send the tools it may call", "tool_choice")
    names = [t.get("function", {}).get("name") for t in req.tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")
    elif choice != "required":
        raise BadRequest(f"tool_choice {choice!r} is not one of 'auto', 'none', 'required' or a named function",
                         "tool_choice")
    return req.tools


def _legacy_function_messages(messages: list[dict]) -> list[dict]:
    """A conversation in OpenAI's deprecated function-calling shape, in its newer one: an
    assistant message's `function_call` becomes its one tool call, and the `function` message
    that answers it a `tool` message. The legacy shape has no call ids, which Mistral's templates
    need to pair a call with its result: each call gets one from its position, and the next
    function message naming it takes the same (a result for a function never called gets an id
    of its own)."""
    if not any(isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m) for m in messages):
        return messages
    out, open_calls = [], {}  # function name -> the id of its latest call without a result yet
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
        elif m.get("role") == "assistant" and "function_call" in m:  # a client may echo it back as null
            call = m["function_call"]
            m = {k: v for k, v in m.items() if k != "function_call"}
            if isinstance(call, dict):
                call_id = open_calls[call.get("name")] = mistral_id(f"legacy-function-call-{i}")
                m = dict(m, tool_calls=[{"id": call_id, "type": "function", "function": call}])
            out.append(m)
        elif m.get("role") == "function":
            call_id = open_calls.pop(m.get("name"), None) or mistral_id(f"legacy-function-result-{i}")
            out.append({"role": "tool", "name": m.get("name"), "content": m.get("content"), "tool_call_id": call_id})
        else:
            out.append(m)
    return out


def _text_content(message: dict) -> dict:
    """OpenAI content parts -> text (we serve text models)."""
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("message content parts must be {'type': 'text', 'text': ...} (text models only)",
                                 "messages")
            parts.append(part["text"])
        message = dict(message, content="".join(parts))
    return message


_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = string.digits + string.ascii_letters


def mistral_id(call_id) -> str:
    """A tool-call id as Mistral's templates accept it (exactly 9 letters or digits): valid ids pass
    through; any other (OpenAI's call_..., UUIDs) maps to one by its hash, so a call and its
    result still match."""
    if isinstance(call_id, str) and _MISTRAL_ID.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(str(call_id).encode()).digest()[:8], "big")
    return "".join(_BASE62[(n // 62**i) % 62] for i in range(9))


def _mistral_tool_ids(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            m = dict(m, tool_calls=[dict(c, id=mistral_id(c.get("id"))) if isinstance(c, dict) else c
                                    for c in m["tool_calls"]])
        elif m.get("role") == "tool" and "tool_call_id" in m:
            m = dict(m, tool_call_id=mistral_id(m["tool_call_id"]))
        out.append(m)
    return out


def within_context(ids, where: str, max_model_len: int) -> list[int]:
    """Prompt ids as a list. One past the context is refused from its length alone, in the words
    of RequestLimits.check (which checks it again with the rest): a worker's array of millions of
    ids never becomes a list in the event loop."""
    if len(ids) >= max_model_len:
        raise BadRequest(f"{where} has {len(ids)} tokens, past the model's context of {max_model_len}: "
                         f"shorten it to at most {max_model_len - 1} tokens")
    return ids.tolist() if isinstance(ids, np.ndarray) else ids
