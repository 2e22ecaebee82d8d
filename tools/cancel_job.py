"""cancel_job: stop a job; its unused compute returns to the agent's budget."""

from __future__ import annotations

from pydantic import Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest
from tools.views import JobView, job_view


class CancelJobRequest(ToolRequest):
    job_id: str = Field(description="The job's id (job_...).")


def cancel_job(ctx: ServiceContext, agent: Agent, request: CancelJobRequest) -> JobView:
    job = jobs.request_cancel(ctx.engine, agent.id, request.job_id)
    ctx.wake_workers()
    return job_view(job)


TOOL = Tool(
    name="cancel_job", request=CancelJobRequest, result=JobView, function=cancel_job, access="destructive",
    description="Stop a job: at once if it has not started; a running one stops at its next step (state "
                "cancelling, then cancelled; its last checkpoint stays). Unused compute returns to your budget.",
    route=Route("POST", "/jobs/{job_id}/cancel"), command=Command(("jobs", "cancel"), args=("job_id",)))
