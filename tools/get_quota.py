"""get_quota: the agent's limits and what is left of its rolling budget."""

from __future__ import annotations

import time

from pydantic import Field
from sqlmodel import Session

from server.context import ServiceContext
from server.store import reservations
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult


class GetQuotaRequest(ToolRequest):
    pass


class Quota(ToolResult):
    agent: str
    budget_flops: float
    budget_window_seconds: float
    budget_flops_spent: float = Field(description="Settled use, open reservations and serving in the window.")
    budget_flops_left: float
    active_jobs: int
    max_concurrent_jobs: int
    max_request_flops: float
    max_request_seconds: float
    max_request_params: int
    max_request_tokens: int
    max_dataset_bytes: int

    def summary(self) -> str:
        return (f"{self.agent}: {self.budget_flops_left:.3g} of {self.budget_flops:.3g} FLOPs left in the "
                f"{self.budget_window_seconds:g} s window; {self.active_jobs}/{self.max_concurrent_jobs} jobs active; "
                f"per request <= {self.max_request_flops:.3g} FLOPs, {self.max_request_seconds:g} s")


def get_quota(ctx: ServiceContext, agent: Agent, request: GetQuotaRequest) -> Quota:
    with Session(ctx.engine) as session:
        spent = reservations.budget_spent(session, agent, time.time())
        active = reservations.active_job_count(session, agent)
    return Quota(agent=agent.name, budget_flops=agent.budget_flops, budget_window_seconds=agent.budget_window_seconds,
                 budget_flops_spent=spent, budget_flops_left=max(0.0, agent.budget_flops - spent),
                 active_jobs=active, max_concurrent_jobs=agent.max_concurrent_jobs,
                 max_request_flops=agent.max_request_flops, max_request_seconds=agent.max_request_seconds,
                 max_request_params=agent.max_request_params, max_request_tokens=agent.max_request_tokens,
                 max_dataset_bytes=agent.max_dataset_bytes)


TOOL = Tool(
    name="get_quota", request=GetQuotaRequest, result=Quota, function=get_quota, access="read",
    description="Your limits (per request and per agent) and what is left of your rolling compute budget.",
    route=Route("GET", "/quota"), command=Command(("quota",)))
