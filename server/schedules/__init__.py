"""Schedules: when work starts on its own, and pipelines of steps gated by conditions.

This package is the part that needs no database:

- `triggers`: the trigger kinds (cron, every, at, after, on_dataset), the policies, fire times,
  which firings are due after a gap, jitter and the overlap decision;
- `conditions`: the small expression language of `when` (parsed with `ast`, never `eval`ed);
- `pipelines`: a pipeline's steps, the `${step.output}` references between them, and what each
  step's condition may name.

Everything here takes the time as an argument (`now`), so the scheduler's clock is injectable.
`refusal` below turns pydantic's validation errors into one `InvalidRequest` in our own words,
naming each field as the caller wrote it (`trigger.timezone`, `pipeline.steps[2].name`).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from server.errors import InvalidRequest

_WORDING = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "dict_type": "must be an object", "model_type": "must be an object",
    "list_type": "must be a list",
    "timezone_aware": "is a time without an offset; add Z (UTC) or an offset such as +02:00",
    "datetime_type": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
    "datetime_parsing": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
    "datetime_from_date_parsing": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
}


def field_path(param: str, loc: tuple[int | str, ...] | list[int | str]) -> str:
    """`pipeline` + ("steps", 2, "name") -> `pipeline.steps[2].name`."""
    return param + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def refusal(err: ValidationError, param: str, model: type[BaseModel]) -> InvalidRequest:
    """Every problem pydantic found, at once, each naming its field; `param` is the first field."""
    problems = [(field_path(param, e["loc"]), e["type"] == "value_error", _message(e, model)) for e in err.errors()]
    # Our own messages start with the value ("'P1M' counts months"); pydantic's become a predicate.
    return InvalidRequest("; ".join(f"{field}{': ' if ours else ' '}{message}" for field, ours, message in problems),
                          param=problems[0][0])


def _message(error: Any, model: type[BaseModel]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "extra_forbidden":
        return f"is not a field here; allowed: {', '.join(_fields_at(model, error['loc'][:-1]))}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("more than", "gt"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx[key]}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must have at most {ctx['max_length']} characters"
    if kind in ("too_short", "too_long"):
        count = ctx["min_length" if kind == "too_short" else "max_length"]
        return f"must have {'at least' if kind == 'too_short' else 'at most'} {count} item{'s' * (count != 1)}"
    return _WORDING.get(kind, error["msg"])


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current else None
        current = _model_in(field.annotation) if field else None
    return list(current.model_fields) if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model inside `Step`, `list[Step]` or `CatchUp | None`."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType):
        for arg in get_args(annotation):
            if found := _model_in(arg):
                return found
    return None
