"""One error base and a few subclasses. Every message tells the caller what to change.

The transports map them in one place (`server/api/errors.py`): MCP answers a tool error whose text
starts with the code, REST answers `http_status` with `{"error": {"code", "message", "param"}}`,
the OpenAI-compatible endpoint answers OpenAI's error shape. A request with several problems lists
every one in `problems` (`[{"param", "message"}]`), the first also as `param`.
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


class WeightsmithError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, *, param: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, **self.details}

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.code}: {self.message}{where}"


class InvalidRequest(WeightsmithError):
    code = "invalid_request"
    http_status = 422

    listed: Sequence[tuple[str, str]] = ()
    """The `(param, message)` pairs it was made `of`: a caller that gathers problems from several checks
    takes these, not the joined message, which already names each param."""

    def problems(self) -> list[tuple[str, str]]:
        """Every `(param, message)` this refusal lists (one, unless it was made with `of`)."""
        if self.listed:
            return list(self.listed)
        listed = self.details.get("problems")
        return [(p["param"], p["message"]) for p in listed] if listed else [(self.param or "", self.message)]

    @classmethod
    def of(cls, problems: Sequence[tuple[str, str]]) -> InvalidRequest:
        """Every problem of a request at once, each `(param, message)`; the first names `param`."""
        listed = "; ".join(f"{param}: {message}" if param else message for param, message in problems)
        made = cls(listed, param=problems[0][0] or None,
                   details={"problems": [{"param": p, "message": m} for p, m in problems]} if len(problems) > 1 else {})
        made.listed = tuple(problems)
        return made


class InvalidDataset(WeightsmithError):
    code = "invalid_dataset"
    http_status = 422


class NotFound(WeightsmithError):
    """Also what an agent gets for another agent's object: its existence is not disclosed."""

    code = "not_found"
    http_status = 404


class Conflict(WeightsmithError):
    code = "conflict"
    http_status = 409


class LimitExceeded(WeightsmithError):
    code = "limit_exceeded"
    http_status = 429


class Unauthorized(WeightsmithError):
    code = "unauthorized"
    http_status = 401


def problems_of(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
                ) -> list[tuple[str, str]]:
    """pydantic's errors in our words: `(param, what to change)`, no library boilerplate or links.
    With the `model` validated, an unknown field's problem lists the fields allowed there."""
    return problems_from(err.errors(include_url=False), prefix, model)


def problems_from(errors: Sequence[Any], prefix: str = "", model: type[BaseModel] | None = None
                  ) -> list[tuple[str, str]]:
    """The same for errors already listed (FastAPI's request validation lists them this way)."""
    found = []
    for error in errors:
        loc = [part for part in error["loc"] if not _is_union_branch(part)]
        where = ".".join(_part(part) for part in loc).replace(".[", "[")
        message = _message(error)
        if error["type"] == "extra_forbidden" and model is not None:
            allowed = _fields_at(model, loc[:-1])
            if allowed:
                message = f"is not a field here; the fields are {', '.join(allowed)}"
        found.append(((prefix + where) if where else prefix.rstrip("."), message))
    return _merged(found)


def invalid_request(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> InvalidRequest:
    return InvalidRequest.of(problems_of(err, prefix, model))


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The fields of the model found at `loc` inside `model` (through lists, unions and optionals)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current else None
        current = _model_in(field.annotation) if field else None
    return list(current.model_fields) if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType) or get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if found := _model_in(arg):
                return found
    return None


def _part(part: str | int) -> str:
    return f"[{part}]" if isinstance(part, int) else str(part)


def _is_union_branch(part: str | int) -> bool:
    # pydantic names the branch of a union it tried ("int", "literal['auto']", "function-after[...]").
    return isinstance(part, str) and (part in {"int", "float", "str", "bool", "list", "dict"} or "[" in part
                                      or part.startswith(("constrained-", "json-or-python")))


def _merged(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A value refused by every branch of a union ("a number or auto") is one problem, not one a branch."""
    merged: dict[str, list[str]] = {}
    for param, message in found:
        messages = merged.setdefault(param, [])
        if message not in messages:
            messages.append(message)
    return [(param, _alternatives(messages)) for param, messages in merged.items()]


def _alternatives(messages: list[str]) -> str:
    """The branches' refusals as one: "must be an integer or auto (got True)", naming the value once."""
    endings = {m[m.rfind(" (got "):] if " (got " in m else "" for m in messages}
    ending = endings.pop() if len(endings) == 1 else ""
    parts = [m.removesuffix(ending) for m in messages]
    if parts[0].startswith("must be "):
        parts[1:] = [part.removeprefix("must be ") for part in parts[1:]]
    return " or ".join(parts) + ending


_WORDS = {
    "missing": "is required",
    "extra_forbidden": "is not a field here; remove it (check the spelling against the tool's schema)",
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number (not NaN or Infinity)",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "model_attributes_type": "must be an object",
    "url_parsing": "must be a URL",
    "timezone_aware": "is a time without an offset; add Z (UTC) or an offset such as +02:00",
    "datetime_type": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
    "datetime_parsing": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
    "datetime_from_date_parsing": "must be an ISO 8601 time such as 2026-03-29T02:30:00Z",
}


def _message(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", "")).replace("'", "")
        text = f"must be one of {expected}" if "," in expected or " or " in expected else f"must be {expected}"
    elif kind in _WORDS:
        text = _WORDS[kind]
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        text = f"must be {sign} {bound}"
    elif kind in ("too_short", "too_long"):
        text = (f"needs at least {ctx.get('min_length')} item(s)" if kind == "too_short"
                else f"takes at most {ctx.get('max_length')} item(s)")
    elif kind == "string_too_short" and ctx.get("min_length") == 1:
        text = "must not be empty"
    elif kind in ("string_too_short", "string_too_long"):
        text = (f"needs at least {ctx.get('min_length')} character(s)" if kind == "string_too_short"
                else f"takes at most {ctx.get('max_length')} characters")
    elif kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    elif kind == "json_invalid":
        return f"is not valid JSON ({ctx.get('error', 'cannot be parsed')}); send a JSON object"
    else:
        text = error["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    shown = _shown(error["input"]) if "input" in error else ""
    # Not for a whole model, nor where our own validator's words quote the value already.
    if kind not in ("missing", "extra_forbidden") and error.get("loc") and shown and shown not in text:
        text += f" (got {shown})"
    return text


def _shown(value: Any) -> str:
    """A short, always encodable picture of what was sent (NaN as NaN, long values cut)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, (dict, list)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

