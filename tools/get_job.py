"""get_job: one job whole: state, progress, error, metrics, model."""

from __future__ import annotations

from pydantic import Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest
from tools.views import JobView, job_view


class GetJobRequest(ToolRequest):
    job_id: str = Field(description="The job's id (job_...).")


def get_job(ctx: ServiceContext, agent: Agent, request: GetJobRequest) -> JobView:
    return job_view(jobs.get(ctx.engine, agent.id, request.job_id))


TOOL = Tool(
    name="get_job", request=GetJobRequest, result=JobView, function=get_job, access="read",
    description="A job now: state, progress (step, loss, tokens/s, ETA), error {code, message, param}, "
                "metrics, model_id once succeeded. A study (tune) shows its best and newest trials.",
    route=Route("GET", "/jobs/{job_id}"), command=Command(("jobs", "show"), args=("job_id",)))
