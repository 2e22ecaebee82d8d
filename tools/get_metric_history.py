"""get_metric_history: one metric over a job's steps, thinned evenly, with its checkpoint steps."""

from __future__ import annotations

from pydantic import Field

from server.context import ServiceContext
from server.store import jobs
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult


class GetMetricHistoryRequest(ToolRequest):
    job_id: str = Field(description="The job's id (job_...).")
    metric: str = Field("loss", description="loss, eval_loss, learning_rate, tokens_per_second, grad_norm, "
                        "reward, ... (available lists what the job reported).")
    max_points: int = Field(100, ge=2, le=1000, description="Thinned evenly to at most this many points.")


class MetricHistory(ToolResult):
    job_id: str
    metric: str
    steps: list[int]
    values: list[float]
    checkpoints: list[int] = Field(description="Steps with a saved checkpoint.")
    available: list[str] = Field(description="Every metric the job reported.")

    def summary(self) -> str:
        if not self.steps:
            return f"{self.job_id}: no {self.metric} yet; available: {', '.join(self.available) or 'none'}"
        pairs = "  ".join(f"{s}:{v:.4g}" for s, v in zip(self.steps, self.values, strict=True))
        return f"{self.job_id} {self.metric} by step: {pairs}"


def get_metric_history(ctx: ServiceContext, agent: Agent, request: GetMetricHistoryRequest) -> MetricHistory:
    series, available = jobs.metric_series(ctx.engine, agent.id, request.job_id, request.metric)
    stride = max(1, -(-len(series) // request.max_points))
    thinned = series[::stride]
    return MetricHistory(job_id=request.job_id, metric=request.metric, steps=[s for s, _ in thinned],
                         values=[v for _, v in thinned], available=available,
                         checkpoints=[c.step for c in jobs.checkpoints(ctx.engine, request.job_id)])


TOOL = Tool(
    toolset="inspect", name="get_metric_history", request=GetMetricHistoryRequest, result=MetricHistory,
    function=get_metric_history, access="read",
    description="One metric of a job over its steps (one value a step: after a resume, the recomputed "
                "steps' values), thinned to max_points, with checkpoint steps.",
    route=Route("GET", "/jobs/{job_id}/metrics"), command=Command(("jobs", "metrics"), args=("job_id",)))
