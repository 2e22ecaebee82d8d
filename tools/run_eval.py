"""run_eval: evaluate a model on a suite, against a baseline, within the agent's limits."""

from __future__ import annotations

from pydantic import ConfigDict, Field
from sqlmodel import Session

from server.admission import guardrails
from server.context import ServiceContext
from server.errors import InvalidRequest
from server.evaluation import evals as evaluation
from server.store.tables import Agent
from tools.views import Compact


class RunEvalRequest(Compact):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Model id (mdl_...) or a local model directory in a data root.")
    suite_id: str
    baseline: str | None = Field(None, description="Model id or directory; default: the model's parent. "
                                 "'none' for no gate.")
    max_seconds: float | None = Field(None, gt=0)
    dry_run: bool = False


class RunEvalResult(Compact):
    admitted: bool
    estimate_flops: float
    models_to_run: list[str]
    job_id: str = ""
    refusal: str = ""


def run_eval(ctx: ServiceContext, agent: Agent, request: RunEvalRequest) -> RunEvalResult:
    with Session(ctx.engine) as session:
        suite_row = evaluation.owned_suite(session, agent.id, request.suite_id)
        candidate = evaluation.resolve_target(session, ctx.settings, agent.id, request.model, "model")
        baseline_ref = candidate.parent_ref if request.baseline is None else request.baseline
        baseline = None
        if baseline_ref and baseline_ref != "none":
            baseline = evaluation.resolve_target(session, ctx.settings, agent.id, baseline_ref, "baseline")
            if baseline.ref == candidate.ref:
                raise InvalidRequest("baseline is the model itself; name another model or 'none'", param="baseline")
        has_report = baseline is not None and evaluation.latest_report(
            session, agent.id, suite_row.id, baseline.ref) is not None
    runs = [candidate.ref] + ([baseline.ref] if baseline and not has_report else [])
    if request.dry_run:
        targets = [candidate] + ([baseline] if baseline and not has_report else [])
        price = evaluation.estimate(ctx.engine, suite_row, [t.parameters for t in targets], request.max_seconds)
        with Session(ctx.engine) as session:
            verdict = guardrails.admit(session, ctx.engine, agent.id, price)
        return RunEvalResult(admitted=verdict.admitted, refusal=verdict.message or "", estimate_flops=price.flops,
                             models_to_run=runs)
    job = evaluation.queue_eval(ctx.engine, ctx.settings.runs_dir, agent, suite_row, candidate, baseline,
                                max_seconds=request.max_seconds, request=request.model_dump(mode="json"))
    ctx.wake_workers()
    return RunEvalResult(admitted=True, estimate_flops=job.estimate_flops, models_to_run=runs, job_id=job.id)
