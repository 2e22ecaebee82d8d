"""Tool schemas as a model should read them, and as short as their meaning allows: the whole tool list
must fit in an agent's context next to its work."""

from __future__ import annotations

from typing import Any

BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
          "maxItems", "minProperties", "maxProperties"}
"""Left out of the listed schema: a value out of bounds is refused naming the field and the bound, and
the bounds of every field together cost a tenth of the tool list."""


def compact_schema(node: Any) -> Any:
    """No restated titles, no `default: null`, `anyOf [X, null]` written as `type: [X, "null"]`, no
    bounds (see BOUNDS), and a `$defs` entry used once put in place. Calls are still validated against
    the whole request model."""
    if isinstance(node, dict) and "$defs" in node:
        defs = node["$defs"]
        uses = _ref_counts(node)
        inlined = {name for name in defs if uses.get(name, 0) == 1}
        node = _inline({k: v for k, v in node.items() if k != "$defs"}, defs, inlined)
        kept = {name: _inline(schema, defs, inlined) for name, schema in defs.items() if name not in inlined}
        if kept:
            node["$defs"] = kept
    return _compact(node)


def _compact(node: Any) -> Any:
    if isinstance(node, list):
        return [_compact(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _compact(prop) for name, prop in value.items()}
        elif key == "title" and isinstance(value, str):
            continue
        elif key == "default" and (value is None or isinstance(value, dict)):
            continue  # null says nothing; a nested model's defaults are in its own schema
        elif key == "additionalProperties" and isinstance(value, bool):
            continue  # true is the default; unknown fields are refused by name anyway
        elif key in BOUNDS or key == "discriminator" or (key == "type" and value == "string" and "const" in node):
            # (a discriminator's mapping points into $defs; a const says its own type)
            continue
        else:
            out[key] = _compact(value)
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(option for option in options if option != {"type": "null"})
        if isinstance(other.get("type"), str) and "$ref" not in other:
            out.pop("anyOf")
            out.update({**other, "type": [other["type"], "null"]})
    return out


def _ref_counts(node: Any, counts: dict[str, int] | None = None) -> dict[str, int]:
    counts = {} if counts is None else counts
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            counts[name] = counts.get(name, 0) + 1
        for value in node.values():
            _ref_counts(value, counts)
    elif isinstance(node, list):
        for item in node:
            _ref_counts(item, counts)
    return counts


def _inline(node: Any, defs: dict[str, Any], inlined: set[str]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, inlined) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.removeprefix("#/$defs/") in inlined:
        merged = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs, inlined)
    return {key: _inline(value, defs, inlined) for key, value in node.items()}
