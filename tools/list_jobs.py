"""list_jobs: the agent's jobs, newest first, a line each; get_job shows one whole."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import Agent, JobState
from tools.base import Command, Route, Tool, ToolRequest, ToolResult, one_or_many
from tools.views import JobSummary, job_summary

JobKind = Literal["train", "tune", "synth", "eval", "pipeline"]


class ListJobsRequest(ToolRequest):
    state: Annotated[list[JobState] | None, BeforeValidator(one_or_many)] = Field(
        None, description="Only jobs in these states (one or a list).")
    kind: JobKind | None = Field(None, description="Only jobs of this kind.")
    limit: int = Field(10, ge=1, le=50, description="Jobs per page.")
    cursor: float | None = Field(None, description="next_cursor of the previous page.")


class JobList(ToolResult):
    jobs: list[JobSummary]
    next_cursor: float | None = Field(None, description="Pass as cursor for the next page; null at the end.")

    def summary(self) -> str:
        lines = [job.summary() for job in self.jobs] or ["no jobs"]
        return "\n".join(lines + ([f"more: --cursor {self.next_cursor}"] if self.next_cursor else []))


def list_jobs(ctx: ServiceContext, agent: Agent, request: ListJobsRequest) -> JobList:
    rows = jobs.list_for_agent(ctx.engine, agent.id, states=request.state or (), kind=request.kind,
                               limit=request.limit, before=request.cursor)
    return JobList(jobs=[job_summary(j) for j in rows],
                   next_cursor=rows[-1].created_at if len(rows) == request.limit else None)


TOOL = Tool(
    name="list_jobs", request=ListJobsRequest, result=JobList, function=list_jobs, access="read",
    description="Your jobs, newest first, one line each (id, kind, method, state, step, model or error "
                "code); filter by state and kind; page with cursor. get_job shows one whole.",
    route=Route("GET", "/jobs"), command=Command(("jobs", "list")))
