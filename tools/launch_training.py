"""launch_training: start a train job within the agent's limits, or price it with `dry_run`.

The request is the core's `TrainRequest` (what a train job is; a study's template and a pipeline's
train step are the same shape) plus what only a call carries: `dry_run` and the idempotency key.
"""

from __future__ import annotations

from pydantic import Field

from server.admission import guardrails
from server.admission.train import TrainRequest, admit_train, build_train_job
from server.context import ServiceContext
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolResult, as_core
from tools.views import JobView, job_view


class LaunchTrainingRequest(TrainRequest):
    idempotency_key: str | None = Field(None, max_length=200, description="A retry with the same key returns "
                                        "the same job; the same key with another request is refused.")
    dry_run: bool = Field(False, description="Price it and give the verdict; start nothing.")


class Estimate(ToolResult):
    parameters: int
    tokens: int
    flops: float = Field(description="About 6 x parameters x tokens (8 for dpo and grpo).")
    max_steps: int
    tokens_per_step: int


class LaunchResult(ToolResult):
    admitted: bool
    dry_run: bool
    estimate: Estimate
    refusal: str | None = Field(None, description="dry_run: which limit, and what would fit (a launch raises).")
    max_steps_that_fit: int | None = None
    budget_flops_left: float | None = Field(None, description="dry_run: your rolling budget left now.")
    job: JobView | None = None

    def summary(self) -> str:
        e = self.estimate
        price = f"{e.flops:.3g} FLOPs ({e.max_steps} steps x {e.tokens_per_step:,} tokens, {e.parameters:,} params)"
        if self.dry_run:
            verdict = "fits" if self.admitted else f"refused: {self.refusal}"
            return f"dry run: {price}; {verdict}; budget left {self.budget_flops_left:.3g}"
        assert self.job is not None
        return f"{self.job.id} {self.job.state}: {price}"


def launch_training(ctx: ServiceContext, agent: Agent, request: LaunchTrainingRequest) -> LaunchResult:
    train = as_core(TrainRequest, request)
    if request.dry_run:
        estimate = build_train_job(ctx, agent, train).estimate
        verdict, left = guardrails.dry_run(ctx.engine, agent.id, estimate)
        return LaunchResult(admitted=verdict.admitted, dry_run=True,
                            estimate=Estimate(**guardrails.estimate_json(estimate)), refusal=verdict.message,
                            max_steps_that_fit=verdict.max_steps_that_fit, budget_flops_left=left)
    job = admit_train(ctx, agent, train, request.idempotency_key)
    return LaunchResult(admitted=True, dry_run=False, estimate=Estimate(**job.resolved["estimate"]), job=job_view(job))


TOOL = Tool(
    name="launch_training", request=LaunchTrainingRequest, result=LaunchResult, function=launch_training,
    access="write",
    description="Start a training job; returns its handle at once (then wait_for_job). Any hyperparameter may "
                "be auto. dry_run prices it (FLOPs ~ 6 x params x tokens) against your limits and starts nothing; "
                "a refusal names the limit and what fits.",
    route=Route("POST", "/trainings"), command=Command(("train",)))
