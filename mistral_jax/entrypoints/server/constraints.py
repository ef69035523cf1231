"""What a request's output must match, from OpenAI's and vLLM's fields: `response_format`
(json_object, json_schema), `tool_choice` "required" or a named function, vLLM's
`structured_outputs` object and its older `guided_*` fields. At most one may be given.

A request's constraint is compiled here once, before any work, so an invalid one is a 400
(ConstraintError names the field); the engine process compiles its own copy."""

from __future__ import annotations

import asyncio
import dataclasses

from mistral_jax.sample.structured import Matcher, StructuredOutputs, tool_calls


class ConstraintError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


_VLLM_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def request_constraint(req, tokenizer, tools: list[dict] | None) -> tuple[StructuredOutputs | None, str | None]:
    """(the constraint, the request field it came from), or (None, None)."""
    found: list[tuple[str, dict]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ConstraintError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                                      "{...}}}: the schema is missing", "response_format")
            found.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise ConstraintError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                                  "response_format")
    if req.structured_outputs is not None:
        unknown = sorted(set(req.structured_outputs) - set(_VLLM_KEYS))
        if unknown:
            raise ConstraintError(f"structured_outputs has unknown keys {unknown}: use one of {list(_VLLM_KEYS)}",
                                  "structured_outputs")
        found.append(("structured_outputs", dict(req.structured_outputs)))
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{key}")
        if value is not None:
            found.append((f"guided_{key}", {key: value}))
    choice = getattr(req, "tool_choice", None)
    if tools and (choice == "required" or isinstance(choice, dict)):
        found.append(("tool_choice", {}))
    if len(found) > 1:
        raise ConstraintError(f"give one output constraint, not {len(found)}: {[f for f, _ in found]}", found[1][0])
    if not found:
        return None, None
    field, spec = found[0]
    try:
        if field == "tool_choice":
            name = choice["function"]["name"] if isinstance(choice, dict) else None
            return tool_calls(tokenizer, tools, name, one=name is not None or req.parallel_tool_calls is False), field
        return StructuredOutputs(**spec), field
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"{field}: {e}", field) from None


async def constrained(jobs, req, tokenizer, tools: list[dict] | None, vocab_size: int):
    """jobs (index, ids, params), each with the request's output constraint, if it has one. The
    grammar compiles off the event loop (a complex one takes a while)."""
    spec, field = request_constraint(req, tokenizer, tools)
    if spec is None:
        return jobs
    try:
        await asyncio.to_thread(Matcher, spec, tokenizer, vocab_size)
    except ValueError as e:
        raise ConstraintError(f"{field}: {e}", field) from None
    return [(index, ids, dataclasses.replace(params, structured_outputs=spec)) for index, ids, params in jobs]
