"""generate_synthetic_data: start a synth job that generates, filters and registers a dataset with its
lineage, or price it with `dry_run`."""

from __future__ import annotations

from pydantic import Field

from server.admission import guardrails
from server.admission.synth import SynthRequest, admit_synth, build_synth_job
from server.context import ServiceContext
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolResult, as_core
from tools.views import JobView, job_view


class GenerateSyntheticDataRequest(SynthRequest):
    dry_run: bool = Field(False, description="Price it and give the verdict; start nothing.")


class SynthLaunch(ToolResult):
    admitted: bool
    estimate_tokens: int = Field(description="Tokens it may generate at most.")
    estimate_flops: float = Field(description="2 x parameters x generated tokens for a local model; 0 otherwise.")
    refusal: str | None = Field(None, description="dry_run: which limit, and what would fit.")
    job: JobView | None = Field(None, description="The synth job; when it succeeds metrics.dataset_id is the "
                                "dataset.")

    def summary(self) -> str:
        price = f"up to {self.estimate_tokens:,} tokens, {self.estimate_flops:.3g} FLOPs"
        if self.job is None:
            return f"dry run: {price}; " + ("fits" if self.admitted else f"refused: {self.refusal}")
        return f"{self.job.id} {self.job.state}: {price}"


def generate_synthetic_data(ctx: ServiceContext, agent: Agent, request: GenerateSyntheticDataRequest) -> SynthLaunch:
    synth = as_core(SynthRequest, request)
    if request.dry_run:
        _, price, _ = build_synth_job(ctx, agent, synth)
        verdict, _ = guardrails.dry_run(ctx.engine, agent.id, price.estimate)
        return SynthLaunch(admitted=verdict.admitted, estimate_tokens=price.tokens,
                           estimate_flops=price.estimate.flops, refusal=verdict.message)
    job, price = admit_synth(ctx, agent, synth)
    return SynthLaunch(admitted=True, estimate_tokens=price.tokens, estimate_flops=price.estimate.flops,
                       job=job_view(job))


TOOL = Tool(
    name="generate_synthetic_data", request=GenerateSyntheticDataRequest, result=SynthLaunch,
    function=generate_synthetic_data, access="write",
    description="Start a job that generates training records (from templates, a local model or an operator's "
                "endpoint), filters them (exact and near duplicates, length, score, 13-gram overlap with your eval "
                "suites) and registers them as a dataset with lineage; wait_for_job, then metrics.dataset_id.",
    route=Route("POST", "/synthetic-data"), command=Command(("synth",)))
