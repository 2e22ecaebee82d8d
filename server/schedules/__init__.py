"""Schedules: when work starts on its own, and pipelines of steps gated by conditions.

This package is the part that needs no database:

- `triggers`: the trigger kinds (cron, every, at, after, on_dataset), the policies, fire times,
  which firings are due after a gap, jitter and the overlap decision;
- `conditions`: the small expression language of `when` (parsed with `ast`, never `eval`ed);
- `pipelines`: a pipeline's steps, the `${step.output}` references between them, and what each
  step's condition may name.

Everything here takes the time as an argument (`now`), so the scheduler's clock is injectable.
`refusal` below names each field as the caller wrote it (`trigger.timezone`, `pipeline.steps[2].name`).
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from server.errors import InvalidRequest, invalid_request


def field_path(param: str, loc: tuple[int | str, ...] | list[int | str]) -> str:
    """`pipeline` + ("steps", 2, "name") -> `pipeline.steps[2].name`."""
    return param + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def refusal(err: ValidationError, param: str, model: type[BaseModel]) -> InvalidRequest:
    """Every problem pydantic found, at once, each naming its field (`param` first): the service's
    one wording of validation errors (`server.errors`), with the fields allowed where one is unknown."""
    return invalid_request(err, f"{param}.", model)
