"""Result models shared by several tools: what an agent sees of a job, a dataset, a model.

Kept compact on purpose: a default tool result stays under about 1,000 tokens.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.store.tables import Dataset, Job, Model


def _drop_property_titles(schema: dict[str, Any]) -> None:
    # Pydantic titles every property with its own name, restated: pure noise in a model's context.
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)


class Compact(BaseModel):
    """Base of every tool request and result model: its JSON schema carries no restated titles."""

    model_config = ConfigDict(json_schema_extra=_drop_property_titles)


def compact_schema(node: Any) -> Any:
    """A JSON schema as a model should read it: no restated titles, no `default: null`, and
    `anyOf [X, null]` written as `type: [X, "null"]`. The meaning is unchanged; the tool list is
    about a third shorter, and it must fit in an agent's context next to its work."""
    if isinstance(node, list):
        return [compact_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: compact_schema(prop) for name, prop in value.items()}
        elif key == "title" and isinstance(value, str):
            continue
        elif key == "default" and (value is None or isinstance(value, dict)):
            continue  # null says nothing; a nested model's defaults are in its own schema
        else:
            out[key] = compact_schema(value)
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(option for option in options if option != {"type": "null"})
        if isinstance(other.get("type"), str):
            out.pop("anyOf")
            out.update({**other, "type": [other["type"], "null"]})
    return out


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class JobError(Compact):
    code: str
    message: str
    param: str | None = None


class Progress(Compact):
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class JobView(Compact):
    id: str
    kind: str
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


def job_view(job: Job) -> JobView:
    keys = Progress.model_fields
    return JobView(
        id=job.id, kind=job.kind, method=job.method, state=job.state, created_at=iso(job.created_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        progress=Progress(**{k: v for k, v in job.progress.items() if k in keys}),
        error=JobError(**job.error) if job.error else None, model_id=job.model_id,
        metrics=study_digest(job) if job.kind == "tune" else {
            k: v for k, v in job.metrics.items() if isinstance(v, (int, float, str)) or v is None},
        hyperparameters=job.resolved.get("hyperparameters", {}), estimate_flops=job.estimate_flops,
        flops_used=job.flops_used, attempts=job.attempts)


TRIALS_SHOWN = 10
"""A study's view lists at most this many trials; the whole table is one request away."""
ENDED_TRIAL_STATES = ("complete", "pruned", "fail")
"""States of a row of a study's trials table once Optuna has been told how the trial ended."""


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


class DatasetView(Compact):
    id: str
    name: str
    content_hash: str
    file_type: str
    format: str | None
    records: int
    bytes: int
    valid: bool
    source: str
    created_at: str | None


def dataset_view(dataset: Dataset) -> DatasetView:
    return DatasetView(id=dataset.id, name=dataset.name, content_hash=dataset.content_hash,
                       file_type=dataset.file_type, format=dataset.format, records=dataset.records,
                       bytes=dataset.bytes, valid=dataset.valid, source=dataset.source,
                       created_at=iso(dataset.created_at))


class ModelView(Compact):
    id: str
    name: str
    path: str = Field(description="Hugging Face directory (the adapter, for LoRA models).")
    merged_path: str | None = None
    adapter: str
    base_model: str
    parent_model_id: str | None
    job_id: str | None
    dataset_hashes: list[str]
    parameters: int
    metrics: dict[str, Any]
    created_at: str | None


def model_view(model: Model) -> ModelView:
    return ModelView(id=model.id, name=model.name, path=model.path, merged_path=model.merged_path,
                     adapter=model.adapter, base_model=model.base_model, parent_model_id=model.parent_model_id,
                     job_id=model.job_id, dataset_hashes=model.dataset_hashes, parameters=model.parameters,
                     metrics={k: v for k, v in model.metrics.items() if isinstance(v, (int, float, str))},
                     created_at=iso(model.created_at))
