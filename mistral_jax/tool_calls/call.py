"""A tool call as read from a model's output, in the shape OpenAI's API returns it, and call ids."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """A whole call. arguments_json: the arguments as the model wrote them (one JSON object's
    text), which OpenAI's API returns and streams; None for a call made here, which gets
    json.dumps of arguments. Calls compare by id, name and arguments."""

    id: str | None
    name: str
    arguments: dict[str, Any]
    arguments_json: str | None = field(default=None, compare=False, repr=False)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape; the arguments travel as a JSON string there."""
        args = self.arguments_json if self.arguments_json is not None else json.dumps(self.arguments,
                                                                                     ensure_ascii=False)
        return {"id": self.id or new_tool_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": args}}


def new_tool_call_id() -> str:
    # mistral-common only accepts 9 ASCII letters/digits as the id of a call echoed back in a later turn.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def call_id_or_new(value: Any) -> str:
    """The id a model wrote for a call, or a new one where it wrote none (missing, empty, null)."""
    return value if isinstance(value, str) and value not in ("", "null") else new_tool_call_id()
