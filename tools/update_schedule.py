"""update_schedule: pause, resume, delete, or fire a schedule now."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field
from sqlmodel import Session

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.schedules import definitions
from server.schedules.scheduler import fire_now
from server.store.db import owned
from server.store.tables import Agent, Schedule
from tools.base import Command, Route, Tool, ToolRequest
from tools.schedule_run import ScheduleView, schedule_view


class UpdateScheduleRequest(ToolRequest):
    schedule_id: str = Field(description="The schedule (sch_...).")
    action: Literal["pause", "resume", "delete", "fire"] = Field(description=(
        "pause; resume (goes on from now, missed firings are not made up); delete (it ends; its runs stay on "
        "record); fire (start a firing now, under its overlap policy)."))


def update_schedule(ctx: ServiceContext, agent: Agent, request: UpdateScheduleRequest) -> ScheduleView:
    now = time.time()
    if request.action == "fire":
        with Session(ctx.engine) as session:
            schedule = owned(session, Schedule, request.schedule_id, agent.id, "schedule_id")
        if schedule.state != "active":
            raise InvalidRequest(f"schedule {schedule.id} is {schedule.state}; resume it first", param="action")
        fire_now(ctx, schedule, now)
        with Session(ctx.engine) as session:
            schedule = owned(session, Schedule, request.schedule_id, agent.id, "schedule_id")
    else:
        schedule = definitions.set_state(ctx.engine, agent.id, request.schedule_id, request.action, now)
    return schedule_view(ctx, schedule, now)


TOOL = Tool(
    name="update_schedule", request=UpdateScheduleRequest, result=ScheduleView, function=update_schedule,
    access="write",
    description="Pause, resume or delete a schedule, or fire it now; returns it with its last run.",
    route=Route("POST", "/schedules/{schedule_id}"),
    command=Command(("schedules", "update"), args=("schedule_id", "action")))
