"""get_job_events: a job's events in order: by default its messages and checkpoints (what happened),
not its per-step metrics, which `get_metric_history` gives as series."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult, one_or_many
from tools.views import iso, scalars

EventType = Literal["message", "metrics", "checkpoint"]


class GetJobEventsRequest(ToolRequest):
    job_id: str = Field(description="The job's id (job_...).")
    # le: the store's integers are 64-bit; a larger one would fail in the query, not be refused naming it.
    after_seq: int = Field(0, ge=0, le=2**63 - 1,
                           description="Events after this one (next_after_seq of the previous page).")
    limit: int = Field(20, ge=1, le=200, description="Events per page.")
    types: Annotated[list[EventType], BeforeValidator(one_or_many)] = Field(
        default_factory=lambda: ["message", "checkpoint"],
        description="Which events: message, checkpoint, metrics (one a step; get_metric_history has series).")


class EventView(ToolResult):
    seq: int
    time: str | None
    level: str
    type: str
    message: str
    data: dict[str, Any]

    def summary(self) -> str:
        return f"{self.seq:>5} {self.time} {self.level:<7} {self.message}"


class EventPage(ToolResult):
    events: list[EventView]
    next_after_seq: int = Field(description="Pass as after_seq to read on.")

    def summary(self) -> str:
        return "\n".join(event.summary() for event in self.events) or "no events"


def get_job_events(ctx: ServiceContext, agent: Agent, request: GetJobEventsRequest) -> EventPage:
    rows = jobs.events(ctx.engine, agent.id, request.job_id, request.after_seq, request.limit, request.types)
    views = [EventView(seq=e.seq, time=iso(e.time), level=e.level, type=e.type, message=e.message[:500],
                       data=scalars(e.data)) for e in rows]
    return EventPage(events=views, next_after_seq=rows[-1].seq if rows else request.after_seq)


TOOL = Tool(
    name="get_job_events", request=GetJobEventsRequest, result=EventPage, function=get_job_events,
    access="read",
    description="A job's events in order: messages and checkpoints by default (add metrics in types for "
                "per-step records); page with after_seq.",
    route=Route("GET", "/jobs/{job_id}/events"), command=Command(("jobs", "events"), args=("job_id",)))
