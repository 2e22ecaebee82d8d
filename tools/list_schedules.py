"""list_schedules: the agent's schedules, with next fire times and last results; one whole by id."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.schedules import definitions
from server.store.db import owned
from server.store.tables import Agent, Schedule
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.schedule_run import RunView, ScheduleView, run_view, schedule_view

RUNS_SHOWN = 10


class ListSchedulesRequest(ToolRequest):
    schedule_id: str | None = Field(None, description="One schedule whole: its request, policies and recent runs.")
    limit: int = Field(20, ge=1, le=100, description="Schedules listed.")


class ScheduleList(ToolResult):
    schedules: list[ScheduleView]
    request: dict[str, Any] | None = Field(None, description="With schedule_id: what each firing starts.")
    policies: dict[str, Any] | None = Field(None, description="With schedule_id: its policies.")
    recent_runs: list[RunView] = Field(default_factory=list, description="With schedule_id: newest first.")

    def summary(self) -> str:
        lines = [s.summary() for s in self.schedules] or ["no schedules"]
        lines += [f"  {r.fire_time} {r.state:<9} {r.job_id or ''} {r.reason[:80]}" for r in self.recent_runs]
        return "\n".join(lines)


def list_schedules(ctx: ServiceContext, agent: Agent, request: ListSchedulesRequest) -> ScheduleList:
    now = time.time()
    with Session(ctx.engine) as session:
        if request.schedule_id is not None:
            one = owned(session, Schedule, request.schedule_id, agent.id, "schedule_id")
            runs = definitions.recent_runs(ctx.engine, one.id, RUNS_SHOWN)
            return ScheduleList(schedules=[schedule_view(ctx, one, now)], request=one.request, policies=one.policies,
                                recent_runs=[run_view(r) for r in runs])
        rows = session.exec(select(Schedule).where(Schedule.agent_id == agent.id)
                            .order_by(col(Schedule.created_at).desc()).limit(request.limit)).all()
    return ScheduleList(schedules=[schedule_view(ctx, s, now) for s in rows])


TOOL = Tool(
    name="list_schedules", request=ListSchedulesRequest, result=ScheduleList, function=list_schedules,
    access="read",
    description="Your schedules: state, next fire times (UTC), runs and the last run's result; with schedule_id "
                "one whole, with its recent runs and why each was skipped, refused or failed.",
    route=Route("GET", "/schedules"), command=Command(("schedules", "list")))
