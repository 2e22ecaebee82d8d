"""run_eval: evaluate a model on a suite, gated against a baseline, within the agent's limits."""

from __future__ import annotations

from pydantic import Field

from server.admission import guardrails
from server.context import ServiceContext
from server.evaluation import jobs as eval_jobs
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import JobView, job_view


class RunEvalRequest(ToolRequest):
    model: str = Field(description="A model id (mdl_...), alias:NAME, or a model directory in a data root.")
    suite_id: str = Field(description="The eval suite (suite_...).")
    baseline: str | None = Field(None, description="Model to gate against; default the model's parent; none: "
                                 "no gate.")
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap.")
    dry_run: bool = Field(False, description="Price it; start nothing.")


class RunEvalResult(ToolResult):
    admitted: bool
    estimate_flops: float
    models_to_run: list[str] = Field(description="The candidate, and the baseline if it has no report yet.")
    refusal: str | None = None
    job: JobView | None = Field(None, description="The eval job; read_eval_report with its id when it ends.")

    def summary(self) -> str:
        if self.job is None:
            return f"dry run: {self.estimate_flops:.3g} FLOPs; " + ("fits" if self.admitted else f"{self.refusal}")
        return f"{self.job.id} {self.job.state}: evaluates {', '.join(self.models_to_run)}"


def run_eval(ctx: ServiceContext, agent: Agent, request: RunEvalRequest) -> RunEvalResult:
    plan = eval_jobs.plan_eval(ctx, agent.id, request.model, request.suite_id, request.baseline, request.max_seconds)
    if request.dry_run:
        verdict, _ = guardrails.dry_run(ctx.engine, agent.id, plan.price)
        return RunEvalResult(admitted=verdict.admitted, refusal=verdict.message, estimate_flops=plan.price.flops,
                             models_to_run=plan.runs)
    job = eval_jobs.queue_eval(ctx.engine, ctx.settings.runs_dir, agent, plan.suite_row, plan.candidate,
                               plan.baseline, max_seconds=request.max_seconds,
                               request=request.model_dump(mode="json", exclude={"dry_run"}))
    ctx.wake_workers()
    return RunEvalResult(admitted=True, estimate_flops=job.estimate_flops, models_to_run=plan.runs, job=job_view(job))


TOOL = Tool(
    name="run_eval", request=RunEvalRequest, result=RunEvalResult, function=run_eval, access="write",
    description="Evaluate a model on an eval suite (an eval job), gated against a baseline with paired "
                "statistics; then read_eval_report with the job id.",
    route=Route("POST", "/evals"), command=Command(("eval", "run"), args=("model", "suite_id")))
