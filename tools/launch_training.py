"""launch_training: start a train job within the agent's limits, or price it with `dry_run`."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field
from sqlmodel import Session, select

from server import guardrails
from server.context import ServiceContext
from server.datasets import resolve_in_roots, sha256_file
from server.db import owned, write_transaction
from server.errors import Conflict, InvalidDataset, InvalidRequest
from server.models import Agent, Dataset, Job, JobState, Model, Reservation
from tools.views import Compact, JobView, job_view
from training_core import modelinfo
from training_core.spec import Hyperparameters as ResolvedHyperparameters
from training_core.spec import JobSpec, Limits, LoraSpec

Auto = Literal["auto"]


class Hyperparameters(Compact):
    model_config = ConfigDict(extra="forbid")
    learning_rate: float | Auto = Field("auto", gt=0, description="auto: 1e-3 below 100M params (LoRA or full), else 2e-4 (LoRA) / 2e-5 (full).")
    max_steps: int | Auto = Field("auto", ge=1, description="auto: `epochs` over the training split.")
    epochs: float = Field(3.0, gt=0, le=100, description="Used only when max_steps is auto.")
    per_device_batch_size: int | Auto = Field("auto", ge=1, le=1024, description="auto: 8, or 4 above 512 tokens.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int | Auto = Field("auto", ge=16, le=131072, description="auto: fits the longest record (p95), within the model's context.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    seed: int = 0
    eval_fraction: float = Field(0.1, ge=0, lt=0.5, description="Held-out share for validation loss before and after.")
    save_steps: int | Auto = Field("auto", ge=1, description="Checkpoint interval; auto: about 5 per run.")
    packing: bool = False


class LoraOptions(Compact):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class RequestLimits(Compact):
    model_config = ConfigDict(extra="forbid")
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap; the job stops with compute_cap_reached.")
    max_flops: float | None = Field(None, gt=0, description="Compute cap for this job.")


class LaunchTrainingRequest(Compact):
    model_config = ConfigDict(extra="forbid")
    method: Literal["sft"] = "sft"
    base_model: str = Field(description="A registered model id (mdl_...) or a local HF model directory inside a data root.")
    datasets: list[str] = Field(min_length=1, max_length=16, description="Dataset ids (upload_dataset); one format.")
    adapter: Literal["full", "lora"] = "lora"
    hyperparameters: Hyperparameters = Hyperparameters()
    lora: LoraOptions = LoraOptions()
    merge_adapter: bool = Field(False, description="With lora: also save a merged full model.")
    limits: RequestLimits = RequestLimits()
    model_name: str | None = Field(None, max_length=120, description="Name of the registered model.")
    idempotency_key: str | None = Field(None, max_length=200, description="A retry with the same key returns the same job.")
    dry_run: bool = Field(False, description="Return the estimate and verdict; start nothing.")


class EstimateView(Compact):
    parameters: int
    tokens: int
    flops: float
    max_steps: int
    tokens_per_step: int


class LaunchResult(Compact):
    admitted: bool
    dry_run: bool
    estimate: EstimateView
    refusal: str | None = Field(None, description="Which limit, and what would fit (dry_run only; a real launch raises).")
    max_steps_that_fit: int | None = None
    budget_flops_left: float | None = Field(None, description="dry_run: your rolling budget left now.")
    job: JobView | None = None


def launch_training(ctx: ServiceContext, agent: Agent, request: LaunchTrainingRequest) -> LaunchResult:
    """Validate, price and admit a train request; the job runs on a worker and this returns at once."""
    request_hash = _request_hash(request)
    if request.idempotency_key and not request.dry_run:
        existing = _existing_for_key(ctx, agent, request.idempotency_key, request_hash)
        if existing is not None:
            return _launched(existing)
    job, estimate, datasets = prepare_train_job(ctx, agent, request, request_hash)

    if request.dry_run:
        with Session(ctx.engine) as session:
            verdict = guardrails.admit(session, ctx.engine, agent.id, estimate)
            left = agent.budget_flops - guardrails.budget_spent(session, agent, time.time())
        return LaunchResult(admitted=verdict.admitted, dry_run=True, estimate=_estimate_view(estimate),
                            refusal=verdict.message, max_steps_that_fit=verdict.max_steps_that_fit,
                            budget_flops_left=max(left, 0.0))

    with write_transaction(ctx.engine) as session:
        if request.idempotency_key:  # checked again under the write lock: two retries may race here
            existing = session.exec(select(Job).where(
                Job.agent_id == agent.id, Job.idempotency_key == request.idempotency_key)).first()
            if existing is not None:
                _same_request_or_conflict(existing, request_hash)
                return _launched(existing)
        verdict = guardrails.admit(session, ctx.engine, agent.id, estimate)
        guardrails.raise_if_refused(verdict, estimate)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=estimate.flops))
    queue_after_snapshot_check(ctx, job, datasets)
    ctx.wake_workers()
    return _launched(job)


def prepare_train_job(ctx: ServiceContext, agent: Agent, request: LaunchTrainingRequest, request_hash: str = "",
                      options: dict[str, Any] | None = None) -> tuple[Job, guardrails.Estimate, list[Dataset]]:
    """Validate and price a train request into an unsaved `validating` job with its spec (`options`
    go into the spec unchanged); a study's trials are built here too."""
    settings = ctx.settings
    with Session(ctx.engine) as session:
        datasets = _owned_datasets(session, agent, request.datasets)
        base_dir, parent = _base_model(session, ctx, agent, request.base_model)
    config = modelinfo.read_model_config(base_dir)
    parameters = modelinfo.count_parameters(base_dir)
    hyper = _resolve(request, datasets, parameters, config)
    tokens_per_step = hyper.per_device_batch_size * hyper.gradient_accumulation_steps * min(
        hyper.max_seq_length, _longest_record_tokens(datasets))
    estimate = guardrails.Estimate(parameters=parameters, tokens_per_step=tokens_per_step, max_steps=hyper.max_steps,
                                   dataset_bytes=sum(d.bytes for d in datasets), max_seconds=request.limits.max_seconds)

    job = Job(agent_id=agent.id, kind="train", method=request.method, state=JobState.validating,
              request=request.model_dump(mode="json"), idempotency_key=request.idempotency_key,
              request_hash=request_hash, estimate_flops=estimate.flops)
    job.run_dir = str((settings.runs_dir / job.id).resolve())
    job.output_dir = str(Path(job.run_dir) / "output")
    spec = JobSpec(
        job_id=job.id, method=request.method, run_dir=job.run_dir, output_dir=job.output_dir,
        base_model=str(base_dir), train_files=[d.path for d in datasets], hyperparameters=hyper,
        adapter=request.adapter, lora=LoraSpec(**request.lora.model_dump()), merge_adapter=request.merge_adapter,
        limits=Limits(max_seconds=min(request.limits.max_seconds or agent.max_request_seconds, agent.max_request_seconds),
                      max_flops=min(request.limits.max_flops or agent.max_request_flops, agent.max_request_flops),
                      max_tokens=agent.max_request_tokens),
        flops_per_token=6.0 * parameters, options=options or {})
    job.resolved = {
        "spec": json.loads(spec.to_json()), "hyperparameters": json.loads(json.dumps(hyper.__dict__)),
        "estimate": _estimate_view(estimate).model_dump(),
        "base_model": request.base_model, "parent_model_id": parent.id if parent else None,
        "dataset_ids": [d.id for d in datasets], "dataset_hashes": [d.content_hash for d in datasets],
        "model_name": request.model_name}

    return job, estimate, datasets


def queue_after_snapshot_check(ctx: ServiceContext, job: Job, datasets: list[Dataset]) -> None:
    """validating -> queued once every snapshot still holds the bytes it was registered with.

    Snapshots are read-only copies, so a mismatch means tampering or disk damage: the job fails
    rather than train on data whose hash its lineage would misstate.
    """
    broken = [d for d in datasets if not _hash_matches(Path(d.path), d.content_hash)]
    with write_transaction(ctx.engine) as session:
        row = session.get(Job, job.id)
        assert row is not None
        if broken:
            row.state = JobState.failed
            row.error = {"code": "invalid_dataset", "param": "datasets",
                         "message": f"snapshot of {broken[0].id} no longer matches its hash; upload it again"}
            guardrails.settle(session, row.id, 0.0)
        else:
            row.state = JobState.queued
        session.add(row)
    job.state, job.error = row.state, row.error


def _resolve(request: LaunchTrainingRequest, datasets: list[Dataset], parameters: int,
             config: dict[str, Any]) -> ResolvedHyperparameters:
    """Turn every `auto` into a value; the result is stored on the job."""
    h = request.hyperparameters
    small = parameters < 100_000_000
    if h.learning_rate != "auto":
        lr = h.learning_rate
    else:
        lr = 1e-3 if small else (2e-4 if request.adapter == "lora" else 2e-5)
    context = int(config.get("max_position_embeddings") or 2048)
    if h.max_seq_length != "auto":
        if h.max_seq_length > context:
            raise InvalidRequest(f"max_seq_length {h.max_seq_length} is over the model's context of {context}",
                                 param="hyperparameters.max_seq_length")
        seq = h.max_seq_length
    else:
        p95 = max(int(d.report.get("stats", {}).get("tokens", {}).get("p95") or 0) for d in datasets)
        seq = min(context, 2048, max(64, 2 ** math.ceil(math.log2(max(p95, 1)))))
    batch = h.per_device_batch_size if h.per_device_batch_size != "auto" else (8 if seq <= 512 else 4)
    train_records = max(1, int(sum(d.records for d in datasets) * (1 - h.eval_fraction)))
    if h.max_steps != "auto":
        steps = h.max_steps
    else:
        steps = max(1, math.ceil(h.epochs * train_records / (batch * h.gradient_accumulation_steps)))
    save_steps = h.save_steps if h.save_steps != "auto" else max(1, steps // 5)
    return ResolvedHyperparameters(
        learning_rate=lr, max_steps=steps, per_device_batch_size=batch,
        gradient_accumulation_steps=h.gradient_accumulation_steps, max_seq_length=seq, warmup_ratio=h.warmup_ratio,
        weight_decay=h.weight_decay, lr_scheduler=h.lr_scheduler, seed=h.seed, eval_fraction=h.eval_fraction,
        save_steps=save_steps, packing=h.packing)


def _owned_datasets(session: Session, agent: Agent, ids: list[str]) -> list[Dataset]:
    datasets = []
    for index, ds_id in enumerate(ids):
        dataset = owned(session, Dataset, ds_id, agent.id, f"datasets[{index}]")
        if not dataset.valid:
            problems = dataset.report.get("problems", [])[:3]
            where = "; ".join(f"line {p.get('line')}: {p.get('message')}" for p in problems)
            raise InvalidDataset(f"dataset {ds_id} failed validation ({where}); fix the file and upload it again",
                                 param=f"datasets[{index}]")
        datasets.append(dataset)
    formats = {d.format for d in datasets}
    if len(formats) > 1:
        raise InvalidRequest(f"datasets mix formats {sorted(f or '?' for f in formats)}; train on one format at a time",
                             param="datasets")
    return datasets


def _base_model(session: Session, ctx: ServiceContext, agent: Agent, ref: str) -> tuple[Path, Model | None]:
    if ref.startswith("mdl_"):
        model = owned(session, Model, ref, agent.id, "base_model")
        if model.adapter == "lora" and not model.merged_path:
            raise InvalidRequest(f"{ref} is a LoRA adapter without a merged copy; train it again with "
                                 "merge_adapter=true to build on it", param="base_model")
        return Path(model.merged_path or model.path), model
    directory = resolve_in_roots(ctx.settings, ref, "base_model")
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"{ref!r} is not a Hugging Face model directory (no config.json)", param="base_model")
    return directory, None


def _longest_record_tokens(datasets: list[Dataset]) -> int:
    return max(int(d.report.get("stats", {}).get("tokens", {}).get("max") or 1) for d in datasets)


def _existing_for_key(ctx: ServiceContext, agent: Agent, key: str, request_hash: str) -> Job | None:
    with Session(ctx.engine) as session:
        existing = session.exec(select(Job).where(Job.agent_id == agent.id, Job.idempotency_key == key)).first()
    if existing is not None:
        _same_request_or_conflict(existing, request_hash)
    return existing


def _same_request_or_conflict(existing: Job, request_hash: str) -> None:
    if existing.request_hash != request_hash:
        raise Conflict(f"idempotency_key was used for a different request (job {existing.id}); "
                       "use a new key for a new request", param="idempotency_key")


def _request_hash(request: LaunchTrainingRequest) -> str:
    payload = request.model_dump(mode="json", exclude={"idempotency_key", "dry_run"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _hash_matches(path: Path, expected: str) -> bool:
    try:
        return sha256_file(path) == expected
    except OSError:
        return False


def _estimate_view(estimate: guardrails.Estimate) -> EstimateView:
    return EstimateView(parameters=estimate.parameters, tokens=estimate.tokens, flops=estimate.flops,
                        max_steps=estimate.max_steps, tokens_per_step=estimate.tokens_per_step)


def _launched(job: Job) -> LaunchResult:
    """A launched job as the caller sees it, the same for a first launch and a same-key retry."""
    return LaunchResult(admitted=True, dry_run=False, estimate=EstimateView(**job.resolved["estimate"]),
                        job=job_view(job))
