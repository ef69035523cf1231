"""Building blocks of tool-call grammars, in llguidance's Lark dialect: `"text"` literals,
`<[id]>` for one token by its id, `%json {schema}` for JSON under a schema."""

from __future__ import annotations

import json
from typing import Any


def functions(tools: list[dict]) -> list[tuple[str, dict]]:
    """(name, arguments schema) of each OpenAI tool, the schema closed (`closed_schema`); no
    schema: a function without parameters, whose only arguments are {}."""
    return [(t["function"]["name"], closed_schema(t["function"].get("parameters") or {"type": "object"}))
            for t in tools]


def closed_schema(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema that does not set
    `additionalProperties` has `additionalProperties: false`: an object takes the keys its schema
    names (`properties`, and `required` keys it does not list, added as any value) and no others.

    Why: in JSON Schema an object may carry keys its schema does not name, and a grammar that
    allows them lets a model that does not know the tool (a small one, or one whose template
    never showed it the tools) invent key after key until max_tokens, and the call never ends.
    OpenAI's strict function calling and xgrammar close objects the same way. llguidance has no
    option for it (its JSON options: separators, whitespace, coerce_one_of, lenient, escapes), so
    the schema is rewritten. Only tool-call grammars use this: a response_format schema keeps
    JSON Schema's meaning.

    A schema that says which other keys it takes (`additionalProperties` true, false or a
    schema; `unevaluatedProperties`; `propertyNames`) keeps it. An object schema with no
    properties at all (`{"type": "object"}`, a function without parameters) allows only {}.

    Left open: an object whose keys come from several schemas that llguidance intersects (its
    own properties, its $ref's target, each allOf member, an anyOf or oneOf branch), and those
    schemas themselves (a root $defs entry too, where such a $ref reaches it): closing one would
    forbid the others' keys (an allOf of two closed objects is unsatisfiable). Schemas under
    `not` stay as they are (closing them would open the negation). Below those places (a
    property's value, an array's items) the same rule applies afresh."""
    return _Closer(schema).close(schema, closable=True)


class _Closer:
    """One pass over a schema; the $defs/definitions entries that a $ref reaches from a place
    that must stay open are found first, and left open themselves."""

    def __init__(self, root: Any):
        self.open_refs: set[str] = set()
        self._find_open_refs(root, closable=True)

    def close(self, s: Any, closable: bool) -> Any:
        if not isinstance(s, dict):
            return s
        out = dict(s)
        if closable and _is_object(s) and _key_sources(s) == int(_names_keys(s)) and not _says_other_keys(s):
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            missing = [k for k in s.get("required", []) if isinstance(k, str) and k not in props]
            if missing:
                out["properties"] = {**props, **{k: {} for k in missing}}
            out["additionalProperties"] = False
        for key, sub, sub_closable in _children(s, closable):
            if key in ("$defs", "definitions"):
                out[key] = {name: self.close(d, f"#/{key}/{name}" not in self.open_refs) for name, d in sub.items()}
            elif key in ("properties", "patternProperties"):
                out[key] = {name: self.close(p, sub_closable) for name, p in out[key].items()}
            elif isinstance(sub, list):
                out[key] = [self.close(x, sub_closable) for x in sub]
            else:
                out[key] = self.close(sub, sub_closable)
        return out

    def _find_open_refs(self, s: Any, closable: bool) -> None:
        if not isinstance(s, dict):
            return
        if isinstance(s.get("$ref"), str) and not (closable and _key_sources(s) == 1):
            self.open_refs.add(s["$ref"])
        for key, sub, sub_closable in _children(s, closable):
            subs = sub.values() if isinstance(sub, dict) and key in _NAMED else sub if isinstance(sub, list) else [sub]
            for x in subs:
                self._find_open_refs(x, sub_closable)


_NAMED = ("properties", "patternProperties", "$defs", "definitions")  # keywords holding {name: subschema}


def _children(s: dict, closable: bool) -> list[tuple[str, Any, bool]]:
    """(keyword, its subschema(s), whether they may be closed) for the keywords that hold
    subschemas which a JSON value is matched against (`not` is left out on purpose). A value
    below the object (a property's, an item's) starts afresh; the parts llguidance intersects
    with the object itself (its $ref's target, allOf members, anyOf/oneOf branches) may be
    closed only where they are the object's one source of keys."""
    alone = closable and _key_sources(s) <= 1
    out = []
    for key in _NAMED:
        if isinstance(s.get(key), dict):
            out.append((key, s[key], True))
    for key in ("items", "prefixItems", "additionalItems", "contains", "additionalProperties"):
        if isinstance(s.get(key), (dict, list)):
            out.append((key, s[key], True))
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(s.get(key), list):
            out.append((key, s[key], alone))
    return out


def _key_sources(s: dict) -> int:
    """How many schemas llguidance intersects to match an object here that may name keys: this
    one where it names properties, its $ref's target, each allOf member, its anyOf and oneOf
    (one branch each)."""
    all_of = s.get("allOf") if isinstance(s.get("allOf"), list) else []
    return int(_names_keys(s)) + int("$ref" in s) + len(all_of) + int("anyOf" in s) + int("oneOf" in s)


def _says_other_keys(s: dict) -> bool:
    """Whether the schema itself says which keys beyond its properties an object may have."""
    return any(k in s for k in ("additionalProperties", "unevaluatedProperties", "propertyNames"))


def _is_object(s: dict) -> bool:
    t = s.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t) or (t is None and _names_keys(s))


def _names_keys(s: dict) -> bool:
    return "properties" in s or "patternProperties" in s


def lark_str(s: str) -> str:
    """s as the inside of a Lark string literal."""
    return s.replace("\\", "\\\\").replace('"', '\\"')


def json_call(tools: list[dict], json_style: dict, **more_properties: dict) -> str:
    """Alternatives, one per tool, of a call written as one JSON object {"name": ..., "arguments":
    {...}} (plus more_properties, optional), its arguments under the function's schema (moved
    into the call's schema: its local $refs are moved with it)."""
    schemas = [{"type": "object", "properties": {"name": {"const": name},
                                                 "arguments": moved_refs(params, "/properties/arguments"),
                                                 **more_properties},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": json_style}
               for name, params in functions(tools)]
    return " | ".join(f"%json {json.dumps(sc)}" for sc in schemas)


def moved_refs(schema: Any, at: str) -> Any:
    """A copy of a schema for use at JSON pointer `at` inside another one: its local $refs by
    pointer ("#/$defs/Item", "#") point to the same place, now under `at` (pydantic's nested models are
    $refs to the root's $defs). Values that are data, not schemas (const, enum, default,
    examples), are copied as they are."""
    if isinstance(schema, list):
        return [moved_refs(x, at) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):  # a JSON pointer
            out[k] = "#" + at + v[1:]
        elif k in ("const", "enum", "default", "examples"):
            out[k] = v
        elif k in ("properties", "patternProperties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: moved_refs(x, at) for name, x in v.items()}  # names, not keywords
        else:
            out[k] = moved_refs(v, at)
    return out
