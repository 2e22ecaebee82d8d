"""schedule_run: make work start on its own: on a cron or an interval, once, after other work ends,
or when a dataset gets a new snapshot; a training request, a study, synthetic data, an eval, or a
gated pipeline of them. `dry_run` shows the next fire times and the price of one firing."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from server.context import ServiceContext
from server.schedules import definitions, work
from server.store.tables import Agent, Schedule
from tools.base import Command, Route, Tool, ToolResult, as_core
from tools.views import iso

NEXT_SHOWN = 3


class ScheduleRunRequest(definitions.ScheduleSpec):
    dry_run: bool = Field(False, description="Create nothing: return the next fire times and one firing's price.")


class RunView(ToolResult):
    fire_time: str | None
    state: str = Field(description="starting, started, succeeded, failed, refused, skipped or buffered.")
    job_id: str | None = None
    reason: str = ""


class ScheduleView(ToolResult):
    id: str
    name: str
    kind: str
    state: str = Field(description="active, paused or ended (with state_reason).")
    state_reason: str = ""
    trigger: dict[str, Any]
    next_fire_times: list[str] = Field(description="ISO 8601, UTC.")
    runs: int
    consecutive_failures: int
    last_run: RunView | None = None
    price_flops: float | None = Field(None, description="dry_run: what one firing reserves now.")

    def summary(self) -> str:
        nxt = self.next_fire_times[0] if self.next_fire_times else "-"
        last = f"{self.last_run.state} {self.last_run.job_id or ''} {self.last_run.reason[:60]}" if self.last_run \
            else "-"
        return f"{self.id}  {self.name:<20} {self.kind:<8} {self.state:<7} next {nxt}  runs {self.runs}  last {last}"


def schedule_view(ctx: ServiceContext, schedule: Schedule, now: float) -> ScheduleView:
    last = definitions.recent_runs(ctx.engine, schedule.id, 1)
    return ScheduleView(
        id=schedule.id, name=schedule.name, kind=schedule.kind, state=schedule.state,
        state_reason=schedule.state_reason, trigger=schedule.trigger, runs=schedule.runs,
        consecutive_failures=schedule.consecutive_failures,
        next_fire_times=[t.isoformat() for t in definitions.upcoming(schedule, NEXT_SHOWN, now)]
        if schedule.state == "active" else [],
        last_run=run_view(last[0]) if last else None)


def run_view(run: Any) -> RunView:
    return RunView(fire_time=iso(run.fire_time), state=run.state, job_id=run.job_id, reason=run.reason[:300])


def schedule_run(ctx: ServiceContext, agent: Agent, request: ScheduleRunRequest) -> ScheduleView:
    spec = as_core(definitions.ScheduleSpec, request)
    now = time.time()
    if request.dry_run:
        trigger = definitions.check(ctx, agent, spec, now)
        draft = Schedule(agent_id=agent.id, name=spec.name or f"{spec.kind}-draft", kind=spec.kind,
                         request=spec.request, trigger=trigger.model_dump(mode="json", exclude_none=True),
                         policies=spec.policies.model_dump(mode="json"), last_fire_at=now)
        view = schedule_view(ctx, draft, now)
        price = None if spec.kind == "pipeline" or "${" in str(spec.request) else \
            work.price_flops(ctx, agent, spec.kind, spec.request)
        return view.model_copy(update={"id": "(dry run)", "price_flops": price})
    return schedule_view(ctx, definitions.create(ctx, agent, spec, now), now)


TOOL = Tool(
    name="schedule_run", request=ScheduleRunRequest, result=ScheduleView, function=schedule_run, access="write",
    description="Make work start on its own: a cron in a time zone, an interval, a time, after a job or schedule "
                "ends (with a condition), or on a new snapshot of a dataset name. Each firing is admitted as your "
                "own call; a refusal counts as a failure. Pipelines chain steps (synth, train, eval, promote when "
                "a condition holds). dry_run shows next fire times and a firing's price.",
    route=Route("POST", "/schedules"), command=Command(("schedules", "create")))
