"""Job tools: get_job, wait_for_job, list_jobs, cancel_job, get_job_events, get_metric_history."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
from pydantic import Field

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store import jobs
from server.store.tables import FINAL_STATES, Agent
from tools.views import Compact, JobView, iso, job_view

WAIT_CAP_SECONDS = 50.0  # clients cut tool calls off near 60 s
ProgressReporter = Callable[[float, float | None, str], Awaitable[None]]


def get_job(ctx: ServiceContext, agent: Agent, job_id: str) -> JobView:
    return job_view(jobs.get(ctx.engine, agent.id, job_id))


def study_trials(ctx: ServiceContext, agent: Agent, study_id: str) -> list[dict[str, Any]]:
    """A study's whole trials table (get_job shows the best and newest of a large one)."""
    job = jobs.get(ctx.engine, agent.id, study_id)
    if job.kind != "tune":
        raise InvalidRequest(f"job {study_id} is a {job.kind} job, not a study (tune_hyperparameters)",
                             param="study_id")
    return list(job.metrics.get("trials") or [])


async def wait_for_job(ctx: ServiceContext, agent: Agent, job_id: str, timeout_seconds: float = 45.0,
                       report: ProgressReporter | None = None) -> JobView:
    """Wait until the job ends or `timeout_seconds` (at most 50) pass; return its state either way."""
    deadline = time.monotonic() + min(max(timeout_seconds, 0.0), WAIT_CAP_SECONDS)
    last_step = None
    while True:
        job = await anyio.to_thread.run_sync(jobs.get, ctx.engine, agent.id, job_id)
        step = job.progress.get("step")
        if report is not None and step != last_step and step is not None:
            last_step = step
            loss = job.progress.get("loss")
            message = f"step {step}/{job.progress.get('max_steps')}" + (f", loss {loss:.4f}" if loss else "")
            await report(float(step), float(job.progress.get("max_steps") or 0) or None, message)
        if job.state in FINAL_STATES or time.monotonic() >= deadline:
            return job_view(job)
        await anyio.sleep(0.25)


class JobList(Compact):
    jobs: list[JobView]
    next_cursor: float | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


def list_jobs(ctx: ServiceContext, agent: Agent, state: list[str] | None = None, kind: str | None = None,
              limit: int = 10, cursor: float | None = None) -> JobList:
    limit = max(1, min(limit, 50))
    rows = jobs.list_for_agent(ctx.engine, agent.id, states=state or (), kind=kind, limit=limit, before=cursor)
    return JobList(jobs=[job_view(j) for j in rows], next_cursor=rows[-1].created_at if len(rows) == limit else None)


def cancel_job(ctx: ServiceContext, agent: Agent, job_id: str) -> JobView:
    job = jobs.request_cancel(ctx.engine, agent.id, job_id)
    ctx.wake_workers()
    return job_view(job)


class EventView(Compact):
    seq: int
    time: str | None
    level: str
    type: Literal["message", "metrics", "checkpoint"] | str
    message: str
    data: dict[str, Any]


class EventPage(Compact):
    events: list[EventView]
    next_after_seq: int = Field(description="Pass as `after_seq` to read on.")


def get_job_events(ctx: ServiceContext, agent: Agent, job_id: str, after_seq: int = 0, limit: int = 50,
                   type: str | None = None) -> EventPage:
    rows = jobs.events(ctx.engine, agent.id, job_id, after_seq, max(1, min(limit, 200)), type)
    views = [EventView(seq=e.seq, time=iso(e.time), level=e.level, type=e.type, message=e.message, data=e.data)
             for e in rows]
    return EventPage(events=views, next_after_seq=rows[-1].seq if rows else after_seq)


class MetricHistory(Compact):
    job_id: str
    metric: str
    steps: list[int]
    values: list[float]
    checkpoints: list[int] = Field(description="Steps with a saved checkpoint.")


def get_metric_history(ctx: ServiceContext, agent: Agent, job_id: str, metric: str = "loss",
                       max_points: int = 200) -> MetricHistory:
    """One metric over steps, thinned evenly to at most `max_points` points."""
    steps: list[int] = []
    values: list[float] = []
    after = 0
    while True:
        rows = jobs.events(ctx.engine, agent.id, job_id, after, 1000, "metrics")
        for event in rows:
            if metric in event.data and event.data[metric] is not None:
                steps.append(int(event.data.get("step", 0)))
                values.append(float(event.data[metric]))
        if len(rows) < 1000:
            break
        after = rows[-1].seq
    stride = max(1, -(-len(steps) // max(1, max_points)))
    return MetricHistory(job_id=job_id, metric=metric, steps=steps[::stride], values=values[::stride],
                         checkpoints=[c.step for c in jobs.checkpoints(ctx.engine, job_id)])
