"""wait_for_job: wait (at most ~50 s: clients cut calls off near 60 s) for a job to end, reporting
progress on the way; returns the job either way."""

from __future__ import annotations

import time

import anyio
from pydantic import Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import FINAL_STATES, Agent
from tools.base import Command, ProgressReporter, Route, Tool, ToolRequest
from tools.views import JobView, job_view

WAIT_CAP_SECONDS = 50.0


class WaitForJobRequest(ToolRequest):
    job_id: str = Field(description="The job's id (job_...).")
    timeout_seconds: float = Field(45.0, ge=0, le=WAIT_CAP_SECONDS, description="Wait at most this long.")


async def wait_for_job(ctx: ServiceContext, agent: Agent, request: WaitForJobRequest,
                       report: ProgressReporter | None = None) -> JobView:
    deadline = time.monotonic() + request.timeout_seconds
    last_step = None
    while True:
        job = await anyio.to_thread.run_sync(jobs.get, ctx.engine, agent.id, request.job_id)
        step = job.progress.get("step")
        if report is not None and step is not None and step != last_step:
            last_step = step
            loss = job.progress.get("loss")
            message = f"step {step}/{job.progress.get('max_steps')}" + (f", loss {loss:.4f}" if loss else "")
            await report(float(step), float(job.progress.get("max_steps") or 0) or None, message)
        if job.state in FINAL_STATES or time.monotonic() >= deadline:
            return job_view(job)
        await anyio.sleep(0.25)


TOOL = Tool(
    name="wait_for_job", request=WaitForJobRequest, result=JobView, function=wait_for_job, access="read",
    waits=True,
    description="Wait until the job ends (succeeded, failed, cancelled), at most timeout_seconds, reporting "
                "progress; returns the job either way. Call again while it is still running.",
    route=Route("POST", "/jobs/{job_id}/wait"), command=Command(("jobs", "wait"), args=("job_id",)))
