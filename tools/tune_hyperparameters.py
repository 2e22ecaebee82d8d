"""tune_hyperparameters: an Optuna study over a train request, whose trials are ordinary train jobs."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store import jobs
from server.store.tables import Agent
from server.tuning.admission import TuneRequest, admit_tune
from tools.base import Command, Route, Tool, ToolResult, as_core


class TuneHyperparametersRequest(TuneRequest):
    idempotency_key: str | None = Field(None, max_length=200, description="A retry with the same key returns "
                                        "the same study.")


class TuneStarted(ToolResult):
    study_id: str = Field(description="The study's tune job: get_job shows its trials and best so far.")
    state: str
    budget_flops: float = Field(description="Reserved whole now; trials are carved out of it.")
    trial_estimate_flops: float = Field(description="One trial at the search space's upper bounds.")
    eval_estimate_flops: float = Field(0.0, description="Each trial's eval, for a KPI objective.")

    def summary(self) -> str:
        return (f"{self.study_id} {self.state}: budget {self.budget_flops:.3g} FLOPs, a trial up to "
                f"{self.trial_estimate_flops + self.eval_estimate_flops:.3g}")


def tune_hyperparameters(ctx: ServiceContext, agent: Agent, request: TuneHyperparametersRequest) -> TuneStarted:
    tune = as_core(TuneRequest, request)
    job = admit_tune(ctx, agent, tune, request.idempotency_key)
    return TuneStarted(study_id=job.id, state=job.state, budget_flops=job.resolved["budget_flops"],
                       trial_estimate_flops=job.resolved["trial_estimate_flops"],
                       eval_estimate_flops=job.resolved.get("eval_estimate_flops", 0.0))


TOOL = Tool(
    name="tune_hyperparameters", request=TuneHyperparametersRequest, result=TuneStarted,
    function=tune_hyperparameters, access="write",
    description="Start an Optuna study (a tune job, returned at once) whose trials are train jobs made from "
                "template. Objective: held-out eval_loss (pruned with hyperband) or kpi:SUITE/KPI (each trial "
                "evaluated on your suite). Its whole budget is reserved now. get_job shows trials and the best.",
    route=Route("POST", "/studies"), command=Command(("tune",)))


def study_trials(ctx: ServiceContext, agent: Agent, study_id: str) -> list[dict[str, Any]]:
    """A study's whole trials table (get_job shows the best and newest of a large one): the MCP
    resource weightsmith://studies/{id}/trials and GET /v1/studies/{id}/trials."""
    job = jobs.get(ctx.engine, agent.id, study_id)
    if job.kind != "tune":
        raise InvalidRequest(f"job {study_id} is a {job.kind} job, not a study (tune_hyperparameters)",
                             param="study_id")
    return list(job.metrics.get("trials") or [])
