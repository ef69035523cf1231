"""A tool call as read from a model's output, in the shape OpenAI's API returns it."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

# What reading a malformed call raises (bad JSON, a missing key, a wrong type): the formats then
# give the whole reply back as text instead of calls.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)


@dataclass
class ToolCall:
    id: str | None
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape; the arguments travel as a JSON string there."""
        return {"id": self.id or new_tool_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    @classmethod
    def parsed(cls, call_id: Any, name: Any, arguments: Any) -> ToolCall:
        """A call from what a model wrote, checked; raises ValueError/TypeError for anything that
        is not a call. An id that is missing or empty gets a new one."""
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = json.loads(arguments)
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise ValueError(f"not a tool call: name={name!r} arguments={arguments!r}")
        valid_id = isinstance(call_id, str) and call_id not in ("", "null")
        return cls(call_id if valid_id else new_tool_call_id(), name, arguments)


def new_tool_call_id() -> str:
    # mistral-common only accepts 9 ASCII letters/digits as the id of a call echoed back in a later turn.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def calls_from_json(value: Any) -> list[ToolCall]:
    """The calls in a parsed JSON object {"name", "arguments"[, "id"]}, or in a list of them."""
    items = value if isinstance(value, list) else [value]
    return [ToolCall.parsed(it.get("id"), it["name"], it.get("arguments", {})) for it in items]
