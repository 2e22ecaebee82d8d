"""Schedules in the store: checking a new one whole (nothing is created if any part is wrong), its
next fire times and the price of one firing, and pausing, resuming, deleting and firing it by hand.

What a firing starts is `kind` and `request`: the request of that kind's tool (see `work.py`), or for
a pipeline `{"steps": [...]}` (see `pipelines.py`). A request may use `${trigger.dataset_id}`, the
snapshot that fired an `on_dataset` schedule, and `${trigger.job_id}` / `${trigger.model_id}`, the
work that fired an `after` schedule.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.admission.requests import RequestModel
from server.context import ServiceContext
from server.errors import Conflict, InvalidRequest
from server.schedules import pipelines, triggers, work
from server.schedules.conditions import Schema
from server.store.db import owned, write_transaction
from server.store.tables import Agent, Job, Schedule, ScheduleRun

ScheduleKind = Literal["train", "tune", "synth", "eval", "pipeline"]
TRIGGER_OUTPUTS: Schema = {"dataset_id": None, "job_id": None, "model_id": None, "report_id": None}
"""What a request may use of what fired it (`${trigger.dataset_id}`)."""


class PromoteRequest(RequestModel):
    alias: str = Field(description="The alias to move (production, staging, ...).")
    model: str = Field(description="The model it moves to: an id or ${step.model_id}.")
    report_id: str | None = Field(None, description="The eval report it moves on the strength of.")


class ScheduleSpec(RequestModel):
    """A schedule: the `schedule_run` fields, without dry_run."""

    name: str | None = Field(None, max_length=120, description="Unique among your schedules.")
    trigger: dict[str, Any] = Field(description=(
        'One of {"cron": "30 2 * * *", "timezone": "Europe/Berlin"} (Debian cron rules at DST changes), '
        '{"every": 3600 or "PT6H", "anchor"?: ISO time}, {"at": ISO time}, {"after": job_ or sch_ id, '
        '"when"?: condition on its result, default state == "succeeded"}, {"on_dataset": dataset name}.'))
    kind: ScheduleKind = Field(description="What a firing starts: train, tune, synth, eval (its tool's fields in "
                               "request) or pipeline ({steps: [...]}).")
    request: dict[str, Any] = Field(description=(
        "The tool's fields (eval: model, suite_id, baseline?). A pipeline: {steps: [{name, kind: synth|train|tune|"
        "eval|promote, request, when?}]}; a step uses earlier outputs as \"${step.model_id}\" (synth: dataset_id; "
        "train: model_id, metrics.X; eval: report_id, verdict, kpis.NAME.value/delta/p_value; promote request: "
        "{alias, model, report_id}); when is a condition such as gate.verdict == \"pass\". "
        "${trigger.dataset_id} is the snapshot that fired it."))
    policies: triggers.Policies = Field(default_factory=triggers.Policies, description="How firings behave.")
    budget_flops: float | None = Field(None, gt=0, description="Its own compute cap per budget_window_seconds.")
    budget_window_seconds: float = Field(86400.0, gt=0, description="Window of budget_flops.")


def check(ctx: ServiceContext, agent: Agent, spec: ScheduleSpec, now: float) -> triggers.TriggerModel:
    """Every problem of the schedule, at once, each naming its field; the trigger as stored."""
    problems: list[tuple[str, str]] = []
    trigger: triggers.TriggerModel | None = None
    try:
        trigger = triggers.parse_trigger(spec.trigger, _utc(now))
    except InvalidRequest as err:
        problems += err.problems()
    if isinstance(trigger, triggers.AfterTrigger):
        problems += _owned_work(ctx.engine, agent.id, trigger.after)
    try:
        check_request(spec.kind, spec.request)
    except InvalidRequest as err:
        problems += err.problems()
    if spec.policies.end_at is not None and spec.policies.end_at.timestamp() <= now:
        problems.append(("policies.end_at", "has passed; give a time in the future or none"))
    if problems:
        raise InvalidRequest.of(problems)
    assert trigger is not None
    return trigger


def check_request(kind: str, request: dict[str, Any], param: str = "request") -> None:
    """The request of a firing as its kind takes it; `${...}` values are checked when they are filled in."""
    given = {"trigger": TRIGGER_OUTPUTS}
    if kind != "pipeline":
        work.parsed(kind, request, param, skip=set(pipelines.references(request)))
        return
    pipeline = pipelines.parse_pipeline(request, param, given)
    problems: list[tuple[str, str]] = []
    for index, step in enumerate(pipeline.steps):
        where = f"{param}.steps[{index}].request"
        try:
            if step.kind == "promote":
                work.parse_model(PromoteRequest, step.request, where, skip=set(pipelines.references(step.request)))
            else:
                work.parsed(step.kind, step.request, where, skip=set(pipelines.references(step.request)))
        except InvalidRequest as err:
            problems += err.problems()
    if problems:
        raise InvalidRequest.of(problems)


def create(ctx: ServiceContext, agent: Agent, spec: ScheduleSpec, now: float | None = None) -> Schedule:
    now = time.time() if now is None else now
    trigger = check(ctx, agent, spec, now)
    name = spec.name or f"{spec.kind}-{int(now)}"
    schedule = Schedule(agent_id=agent.id, name=name, kind=spec.kind, request=spec.request,
                        trigger=trigger.model_dump(mode="json", exclude_none=True),
                        policies=spec.policies.model_dump(mode="json"), budget_flops=spec.budget_flops,
                        budget_window_seconds=spec.budget_window_seconds, last_fire_at=now)
    schedule.next_fire_at = next_look(schedule, trigger, now)
    with write_transaction(ctx.engine) as session:
        if session.exec(select(Schedule).where(Schedule.agent_id == agent.id, Schedule.name == name)).first():
            raise Conflict(f"you have a schedule named {name!r}; pick another name or delete it", param="name")
        session.add(schedule)
    return schedule


def upcoming(schedule: Schedule, count: int, now: float) -> list[datetime]:
    """The schedule's next `count` fire times after `now`, before its end time (none once ended)."""
    if schedule.state == "ended":
        return []
    policies = triggers.Policies.model_validate(schedule.policies)
    times = triggers.next_fire_times(triggers.load_trigger(schedule.trigger), _utc(now), count, policies.end_at)
    left = None if policies.max_runs is None else max(0, policies.max_runs - schedule.runs)
    return times if left is None else times[:left]


def next_look(schedule: Schedule, trigger: triggers.TriggerModel, after: float) -> float | None:
    """When the scheduler next looks at a time-triggered schedule: its next fire time after `after`,
    plus its jitter; None for event triggers (looked at every tick) and when nothing is left."""
    if isinstance(trigger, triggers.AfterTrigger | triggers.DatasetTrigger):
        return None
    policies = triggers.Policies.model_validate(schedule.policies)
    following = triggers.next_fire_times(trigger, _utc(after), 1, policies.end_at)
    if not following:
        return None
    fire = following[0]
    return fire.timestamp() + triggers.jitter_offset(schedule.id, fire, policies.jitter_seconds)


def set_state(engine: Engine, agent_id: str, schedule_id: str, action: str, now: float) -> Schedule:
    """pause, resume or delete (which ends it: its runs and jobs stay on record)."""
    with write_transaction(engine) as session:
        schedule = owned(session, Schedule, schedule_id, agent_id, "schedule_id")
        if action == "pause":
            if schedule.state == "ended":
                raise InvalidRequest(f"schedule {schedule_id} has ended; create a new one", param="action")
            schedule.state, schedule.state_reason = "paused", "paused by its agent"
        elif action == "resume":
            if schedule.state == "ended":
                raise InvalidRequest(f"schedule {schedule_id} has ended; create a new one", param="action")
            # Firings missed while paused are not made up: it goes on from now.
            schedule.state, schedule.state_reason, schedule.consecutive_failures = "active", "", 0
            schedule.last_fire_at = now
            schedule.next_fire_at = next_look(schedule, triggers.load_trigger(schedule.trigger), now)
        else:
            schedule.state, schedule.state_reason, schedule.next_fire_at = "ended", "deleted by its agent", None
        session.add(schedule)
        return schedule


def recent_runs(engine: Engine, schedule_id: str, limit: int) -> list[ScheduleRun]:
    with Session(engine) as session:
        return list(session.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
                                 .order_by(col(ScheduleRun.fire_time).desc()).limit(limit)))


def _owned_work(engine: Engine, agent_id: str, ref: str) -> list[tuple[str, str]]:
    with Session(engine) as session:
        row = session.get(Job if ref.startswith("job_") else Schedule, ref)
    if row is None or row.agent_id != agent_id:
        return [("trigger.after", f"no job or schedule {ref!r} of yours; list_jobs and list_schedules show them")]
    return []



def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
