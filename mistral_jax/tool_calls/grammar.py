"""Building blocks of tool-call grammars, in llguidance's Lark dialect: `"text"` literals,
`<[id]>` for one token by its id, `%json {schema}` for JSON under a schema."""

from __future__ import annotations

import json


def functions(tools: list[dict]) -> list[tuple[str, dict]]:
    """(name, arguments schema) of each OpenAI tool; no schema: any object."""
    return [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"}) for t in tools]


def lark_str(s: str) -> str:
    """s as the inside of a Lark string literal."""
    return s.replace("\\", "\\\\").replace('"', '\\"')


def json_call(tools: list[dict], json_style: dict, **more_properties: dict) -> str:
    """Alternatives, one per tool, of a call written as one JSON object {"name": ..., "arguments":
    {...}} (plus more_properties, optional), its arguments under the function's schema."""
    schemas = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params, **more_properties},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": json_style}
               for name, params in functions(tools)]
    return " | ".join(f"%json {json.dumps(sc)}" for sc in schemas)
