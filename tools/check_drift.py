"""check_drift: is a new dataset unlike a model's training data, and have a model's KPIs left their
usual range? Runs in the call (each side is sampled to 2,000 records)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from server.context import ServiceContext
from server.evaluation import data_drift
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult


class CheckDriftRequest(ToolRequest):
    against: str = Field(description="A model (mdl_... or alias:NAME: its training data and its reports) or a "
                         "reference dataset (ds_...).")
    dataset_id: str | None = Field(None, description="New data to compare with against's (data drift).")
    suite_id: str | None = Field(None, description="Check against's KPIs on this suite against their history.")


class DriftResult(ToolResult):
    drifted: bool
    data: dict[str, Any] = Field(default_factory=dict)
    kpi: dict[str, Any] = Field(default_factory=dict)


def check_drift(ctx: ServiceContext, agent: Agent, request: CheckDriftRequest) -> DriftResult:
    data_result, kpi_result = data_drift.check(ctx.engine, agent.id, request.against, request.dataset_id,
                                               request.suite_id)
    drifted = bool(data_result and data_result["drifted"]) or any(
        (v or {}).get("drifted") for v in (kpi_result or {}).values())
    return DriftResult(data=data_result or {}, kpi=kpi_result or {}, drifted=drifted)


TOOL = Tool(
    toolset="inspect", name="check_drift", request=CheckDriftRequest, result=DriftResult, function=check_drift,
    access="read",
    description="Data drift of a dataset from a model's training data (word distance, domain classifier AUC), "
                "and KPI drift of a model's newest report against its family's history.",
    route=Route("GET", "/drift"), command=Command(("eval", "drift"), args=("against",)))
