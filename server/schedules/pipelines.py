"""Pipelines: ordered, named steps, each of which may use earlier steps' outputs and be gated.

    {"steps": [
      {"name": "data", "kind": "synth", "request": {"seed_dataset": "tickets", "records": 500}},
      {"name": "train", "kind": "train",
       "request": {"base_model": "alias:production", "datasets": ["${data.dataset_id}"], "method": "sft"}},
      {"name": "gate", "kind": "eval", "request": {"model": "${train.model_id}", "suite": "support"}},
      {"name": "ship", "kind": "promote",
       "request": {"alias": "production", "model": "${train.model_id}", "report": "${gate.report_id}"},
       "when": "gate.verdict == \\"pass\\" and gate.kpis.tool_call.value >= 0.8"}]}

A reference is a whole string value `${step.output}` (dots into nested outputs:
`${gate.kpis.tool_call.value}`); it is replaced by the output's value, whatever its type, so
`"${tune.best_value}"` becomes a number. `${` inside a longer string is refused rather than left
as text, since it is almost always a reference written by mistake. A step's `when` names earlier
steps' outputs without `${}` (`gate.verdict`); a step whose condition does not hold ends the run.

Only structure is checked here: names, kinds, references and conditions. Each step's request is
validated as the request of that kind (launch_training's fields, ...) when the pipeline is admitted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidRequest
from server.schedules import field_path, refusal
from server.schedules.conditions import Condition, Schema, dotted, parse, schema_error

StepKind = Literal["synth", "train", "tune", "eval", "promote"]

_KPI = {"value": None, "delta": None, "ci95_low": None, "ci95_high": None, "p_value": None, "verdict": None}
# What a finished step of each kind makes; "*" stands for any name (a metric, a KPI, a parameter).
OUTPUTS: dict[str, Schema] = {
    "synth": {"dataset_id": None},
    "train": {"job_id": None, "model_id": None, "metrics": {"*": None}},
    "tune": {"job_id": None, "model_id": None, "best_value": None, "best_params": {"*": None}},
    "eval": {"job_id": None, "report_id": None, "verdict": None, "kpis": {"*": _KPI}},
    "promote": {"alias": None, "model_id": None},
}
MAX_STEPS = 20

_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_REFERENCE = re.compile(r"^\$\{([^{}]*)\}$")


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="The step's name, unique in the pipeline: a lowercase letter, then "
                                  "lowercase letters, digits or _ (at most 40). Later steps use its "
                                  "outputs as ${name.output} in requests and name.output in conditions.")
    kind: StepKind = Field(description="synth makes dataset_id; train makes job_id, model_id, metrics.<name>; "
                                       "tune makes job_id, model_id, best_value, best_params.<name>; eval makes "
                                       "job_id, report_id, verdict, kpis.<name>.{value, delta, ci95_low, "
                                       "ci95_high, p_value, verdict}; promote makes alias, model_id.")
    request: dict[str, Any] = Field(description="The request of that kind (for train, launch_training's fields). "
                                                "A string value \"${step.output}\" is replaced by an earlier "
                                                "step's output.")
    when: str | None = Field(None, description="Run the step only if this condition on earlier steps' outputs "
                                               "holds, e.g. gate.verdict == \"pass\"; otherwise the run ends "
                                               "there, with the reason. Default: always.")

    @field_validator("name")
    @classmethod
    def _name_is_an_identifier(cls, name: str) -> str:
        if not _STEP_NAME.match(name):
            raise ValueError(f"{name!r} is not a step name: use a lowercase letter, then lowercase letters, "
                             "digits or _ (at most 40), e.g. train or eval_gate")
        return name


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,
                              description="The steps, run in this order; each starts when the one before "
                                          "succeeded. A failed step or a condition that does not hold ends "
                                          "the run.")


def parse_pipeline(raw: Any, param: str = "pipeline", given: Mapping[str, Schema] | None = None) -> Pipeline:
    """The pipeline once its structure, references and conditions are sound; otherwise one
    InvalidRequest listing every problem, each with its field (`pipeline.steps[2].request.model`).
    `given`: outputs every step may use besides earlier steps' (what fired the run: `trigger`)."""
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as err:
        raise refusal(err, param, Pipeline) from err
    problems: list[tuple[str, str]] = []
    first_index: dict[str, int] = {}
    for index, step in enumerate(pipeline.steps):
        where = field_path(param, ("steps", index))
        if step.name in first_index:
            clash = f"{step.name!r} already names steps[{first_index[step.name]}]; give each step its own name"
            problems.append((f"{where}.name", clash))
        first_index.setdefault(step.name, index)
        for loc, text in _strings(step.request, ("request",)):
            if why := _reference_problem(text, pipeline.steps, index, given or {}):
                problems.append((field_path(where, loc), why))
        if step.when is not None:
            try:
                parse(step.when, f"{where}.when", condition_schema(pipeline, index, given))
            except InvalidRequest as err:
                problems.append((f"{where}.when", err.message))
    if problems:
        raise InvalidRequest.of(problems)
    return pipeline


def references(request: Any) -> list[tuple[str | int, ...]]:
    """Where a request holds `${...}` references: values filled in only when the step starts."""
    return [loc for loc, text in _strings(request, ()) if _REFERENCE.match(text)]


def condition_schema(pipeline: Pipeline, index: int, given: Mapping[str, Schema] | None = None) -> Schema:
    """What the `when` of step `index` may name: each earlier step's outputs under its name (and `given`)."""
    return {**(given or {}), **{step.name: OUTPUTS[step.kind] for step in pipeline.steps[:index]}}


def step_condition(pipeline: Pipeline, index: int, given: Mapping[str, Schema] | None = None) -> Condition | None:
    """The parsed `when` of step `index`; evaluate it on {step name: outputs} of the steps before."""
    when = pipeline.steps[index].when
    return None if when is None else parse(when, f"pipeline.steps[{index}].when",
                                           condition_schema(pipeline, index, given))


def resolve_request(step: Step, outputs: Mapping[str, Mapping[str, Any]], param: str = "request") -> dict[str, Any]:
    """The step's request with each `${step.output}` replaced from `outputs` ({step name: outputs}).
    An output that an earlier step did not make (a metric it never logged) is an InvalidRequest
    naming the field, for the run to end with."""
    def substitute(value: Any, loc: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {key: substitute(item, (*loc, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [substitute(item, (*loc, i)) for i, item in enumerate(value)]
        if not (isinstance(value, str) and (match := _REFERENCE.match(value))):
            return value
        path = match.group(1).split(".")
        current: Any = outputs
        for depth, part in enumerate(path):
            if not (isinstance(current, Mapping) and part in current):
                raise InvalidRequest(f"{value} has no value: step {path[0]!r} made no "
                                     f"{dotted(path[1:depth + 1]) or 'outputs'}", param=field_path(param, loc))
            current = current[part]
        return current

    return substitute(step.request, ())


def _strings(value: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*loc, i))
    elif isinstance(value, str):
        yield loc, value


def _reference_problem(text: str, steps: list[Step], index: int, given: Mapping[str, Schema]) -> str | None:
    if "${" not in text:
        return None
    match = _REFERENCE.match(text)
    if not match:
        return (f"{text!r} holds ${{ inside a longer string; a reference is a whole string value such as "
                "\"${train.model_id}\"")
    path = match.group(1).split(".")
    if len(path) < 2 or not all(path):
        return f"{text!r} names no output; write ${{step.output}}, e.g. ${{train.model_id}}"
    if path[0] in given:
        why = schema_error(path, given)
        return f"{text!r}: {why}" if why else None
    earlier = {step.name: step for step in steps[:index]}
    names = ", ".join(earlier) or "none"
    if path[0] not in earlier:
        if any(step.name == path[0] for step in steps[index:]):
            return (f"{text!r} uses step {path[0]!r}, which does not come before this one; a step may use only "
                    f"earlier steps' outputs (earlier steps: {names})")
        return f"{text!r} names no earlier step {path[0]!r}; earlier steps: {names}"
    kind = earlier[path[0]].kind
    if why := schema_error(path, {path[0]: OUTPUTS[kind]}):
        return f"{text!r}: {why} (the outputs of a {kind} step)"
    return None
