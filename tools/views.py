"""What an agent sees of a job, a dataset, a model: shared by several tools' results.

Kept compact on purpose: a default tool result stays well under 2,000 tokens. A list shows a short
summary of each object; the get tools show one object whole.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from server.store.tables import Dataset, Job, Model
from server.tuning.admission import ENDED_TRIAL_STATES
from tools.base import ToolResult

TRIALS_SHOWN = 10
"""A study's view lists at most this many trials; the whole table is one request away."""


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def scalars(values: dict[str, Any]) -> dict[str, Any]:
    """The plain values of a metrics dict (numbers, strings, flags): nested tables stay out of views."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}


class JobError(ToolResult):
    code: str
    message: str
    param: str | None = None


class Progress(ToolResult):
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class JobView(ToolResult):
    id: str
    kind: str = Field(description="train, tune, synth, eval or pipeline")
    method: str
    state: str = Field(description="validating, queued, running, cancelling, succeeded, failed or cancelled")
    created_at: str | None
    started_at: str | None = None
    finished_at: str | None = None
    progress: Progress = Progress()
    error: JobError | None = None
    model_id: str | None = Field(None, description="The registered model, once succeeded.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="Resolved; no `auto` left.")
    estimate_flops: float = 0.0
    flops_used: float = 0.0
    attempts: int = 0

    def summary(self) -> str:
        line = f"{self.id}  {self.kind}/{self.method}  {self.state}"
        if self.progress.step is not None:
            line += f"  step {self.progress.step}/{self.progress.max_steps}"
            if self.progress.loss is not None:
                line += f"  loss {self.progress.loss:.4g}"
        if self.model_id:
            line += f"  model {self.model_id}"
        if self.error:
            line += f"\n  error {self.error.code}: {self.error.message}"
        shown = {k: v for k, v in self.metrics.items() if not isinstance(v, (list, dict))}
        if shown:
            line += "\n  " + "  ".join(f"{k}={_short(v)}" for k, v in list(shown.items())[:12])
        return line


def job_view(job: Job) -> JobView:
    keys = Progress.model_fields
    return JobView(
        id=job.id, kind=job.kind, method=job.method, state=job.state, created_at=iso(job.created_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        progress=Progress(**{k: v for k, v in job.progress.items() if k in keys}),
        error=JobError(**job.error) if job.error else None, model_id=job.model_id,
        metrics=study_digest(job) if job.kind == "tune" else scalars(job.metrics),
        hyperparameters=job.resolved.get("hyperparameters", {}), estimate_flops=job.estimate_flops,
        flops_used=job.flops_used, attempts=job.attempts)


class JobSummary(ToolResult):
    """A job as a list shows it; get_job has the rest."""

    id: str
    kind: str
    method: str
    state: str
    created_at: str | None
    step: int | None = None
    max_steps: int | None = None
    model_id: str | None = None
    error: str | None = Field(None, description="The error's code, when failed.")

    def summary(self) -> str:
        step = f"{self.step}/{self.max_steps}" if self.step is not None else "-"
        return f"{self.id}  {self.kind:<8} {self.method:<18} {self.state:<10} {step:>9}  " \
               f"{self.model_id or self.error or ''}"


def job_summary(job: Job) -> JobSummary:
    return JobSummary(id=job.id, kind=job.kind, method=job.method, state=job.state, created_at=iso(job.created_at),
                      step=job.progress.get("step"), max_steps=job.progress.get("max_steps"),
                      model_id=job.model_id, error=(job.error or {}).get("code"))


def study_digest(job: Job) -> dict[str, Any]:
    """A study's result with its trials table cut to the ones an agent acts on: the best complete
    trials, the ones still running and the newest, so a 200-trial study still reads in ~1,000 tokens."""
    trials = job.metrics.get("trials") or []
    if len(trials) <= TRIALS_SHOWN:
        return job.metrics
    sign = -1.0 if job.metrics.get("direction") == "maximize" else 1.0
    complete = sorted((t for t in trials if t["state"] == "complete" and t["value"] is not None),
                      key=lambda t: sign * t["value"])
    open_ = [t for t in trials if t["state"] not in ENDED_TRIAL_STATES]
    newest = sorted(trials, key=lambda t: -t["number"])
    shown: dict[int, dict[str, Any]] = {}
    for trial in [*complete[:TRIALS_SHOWN // 2], *open_, *newest]:
        if len(shown) >= TRIALS_SHOWN:
            break
        shown.setdefault(trial["number"], trial)
    return {**job.metrics, "trials": sorted(shown.values(), key=lambda t: t["number"]),
            "trials_total": len(trials), "trials_omitted": len(trials) - len(shown),
            "all_trials": f"weightsmith://studies/{job.id}/trials (REST GET /v1/studies/{job.id}/trials)"}


class DatasetView(ToolResult):
    id: str
    name: str
    content_hash: str
    file_type: str
    format: str | None
    records: int
    bytes: int
    source: str = Field(description="upload, the path it was registered from, or synth:JOB_ID.")
    created_at: str | None
    lineage: dict[str, Any] | None = Field(None, description="How a generated dataset was made: its job, task, "
                                           "generator, seed, sources and what it was decontaminated against, "
                                           "by id and hash.")

    def summary(self) -> str:
        return f"{self.id}  {self.name}  {self.format}  {self.records} records  {self.bytes:,} bytes  {self.source}"


def dataset_view(dataset: Dataset, lineage: bool = True) -> DatasetView:
    return DatasetView(id=dataset.id, name=dataset.name, content_hash=dataset.content_hash,
                       file_type=dataset.file_type, format=dataset.format, records=dataset.records,
                       bytes=dataset.bytes, source=dataset.source, created_at=iso(dataset.created_at),
                       lineage=lineage_digest(dataset.lineage) if lineage and dataset.lineage else None)


def lineage_digest(lineage: dict[str, Any]) -> dict[str, Any]:
    """A generated dataset's lineage without its bulky parts (templates, prompts): what made it and
    from what, every input by id and hash."""
    keep = ("job_id", "task", "generator", "seed", "records", "sources", "decontaminated_against")
    digest = {k: lineage[k] for k in keep if k in lineage}
    if isinstance(digest.get("generator"), dict):
        digest["generator"] = digest["generator"].get("describe") or digest["generator"].get("type")
    return digest


class ModelView(ToolResult):
    id: str
    name: str
    adapter: str = Field(description="full weights, or a lora adapter (on base_model).")
    base_model: str = Field(description="The parent model id, a base directory, or scratch:PRESET.")
    parent_model_id: str | None
    job_id: str | None
    dataset_hashes: list[str]
    parameters: int
    aliases: list[str] = Field(default_factory=list, description="Your aliases that point at it.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Its job's headline metrics.")
    created_at: str | None

    def summary(self) -> str:
        aliases = f"  [{', '.join(self.aliases)}]" if self.aliases else ""
        return f"{self.id}  {self.name}  {self.adapter}  {self.parameters:,} params  from {self.base_model}{aliases}"


HEADLINE_METRICS = ("eval_loss_before", "eval_loss_after", "heldout_after_perplexity", "train_loss",
                    "tokens_per_second", "mfu", "reward", "heldout_reward_after", "eval_accuracy_after")


def model_view(model: Model, aliases: list[str]) -> ModelView:
    return ModelView(id=model.id, name=model.name, adapter=model.adapter, base_model=model.base_model,
                     parent_model_id=model.parent_model_id, job_id=model.job_id,
                     dataset_hashes=model.dataset_hashes, parameters=model.parameters, aliases=aliases,
                     metrics={k: _short(model.metrics[k]) for k in HEADLINE_METRICS
                              if model.metrics.get(k) is not None},
                     created_at=iso(model.created_at))


def _short(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value
