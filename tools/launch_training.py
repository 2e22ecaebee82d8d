"""launch_training: start a train job within the agent's limits, or price it with `dry_run`."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from sqlmodel import Session, select

from server.admission import guardrails
from server.admission.datasets import resolve_in_roots, sha256_file
from server.context import ServiceContext
from server.errors import Conflict, InvalidDataset, InvalidRequest
from server.store.db import owned, write_transaction
from server.store.tables import Agent, Dataset, EvalSuite, Job, JobState, Model, Reservation
from tools.views import Compact, JobView, job_view
from training_core import methods, modelinfo, token_counts
from training_core.spec import Hyperparameters as ResolvedHyperparameters
from training_core.spec import JobSpec, Limits, LoraSpec

Auto = Literal["auto"]


PACKED_METHODS = ("pretrain", "continued_pretrain")
"""Methods that cut the corpus into full blocks rather than train a record to a sequence."""


class Hyperparameters(Compact):
    model_config = ConfigDict(extra="forbid")
    learning_rate: Annotated[float, Field(gt=0)] | Auto = Field("auto", description="auto: 1e-3 below 100M params, else 2e-4 (LoRA, pretraining) or 2e-5.")
    max_steps: Annotated[int, Field(ge=1)] | Auto = Field("auto", description="auto: `epochs` over the training split.")
    epochs: float = Field(3.0, gt=0, le=100, description="Used only when max_steps is auto.")
    per_device_batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field("auto", description="auto: 8, or 4 above 512 tokens.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] | Auto = Field("auto", description="auto: fits the longest record (p95), within the model's context.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    seed: int = 0
    eval_fraction: float = Field(0.1, ge=0, lt=0.5, description="Held-out share for validation loss before and after.")
    save_steps: Annotated[int, Field(ge=1)] | Auto = Field("auto", description="Checkpoint interval; auto: about 5 per run.")
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
    method: methods.MethodName = "sft"
    base_model: str | None = Field(None, description="A registered model id (mdl_...) or a local HF model directory "
                                   "inside a data root; none for pretrain, which builds one from options.preset.")
    datasets: list[str] = Field(min_length=1, max_length=16, description="Dataset ids (upload_dataset); one format.")
    adapter: Literal["full", "lora"] = "lora"
    hyperparameters: Hyperparameters = Hyperparameters()
    lora: LoraOptions = LoraOptions()
    merge_adapter: bool = Field(False, description="With lora: also save a merged full model.")
    options: dict[str, Any] | None = Field(None, description="Method options (see tools/methods.py).")
    devices: int = Field(1, ge=1, le=64, description="Processes (GPUs, or CPU processes) to train on, via accelerate.")
    limits: RequestLimits = RequestLimits()
    model_name: str | None = Field(None, max_length=120, description="Name of the registered model.")
    idempotency_key: str | None = Field(None, max_length=200, description="A retry with the same key returns the same job.")
    dry_run: bool = Field(False, description="Return the estimate and verdict; start nothing.")
    eval_suite: str | None = Field(None, description="Suite id: evaluate the new model against its parent when done.")


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
    """Validate and price a train request into an unsaved `validating` job with its spec; `options`
    (the service's own, such as a study trial's `eval_steps`) join the method's validated options.
    A study's trials are built here too."""
    settings = ctx.settings
    method = methods.METHODS[request.method]
    method_options = _validated_options(request.method, request.options)
    with Session(ctx.engine) as session:
        datasets = _owned_datasets(session, agent, request.datasets)
        _check_formats(request.method, datasets)
        if method_options.get("reference_dataset"):
            reference = owned(session, Dataset, method_options["reference_dataset"], agent.id,
                              "options.reference_dataset")
            method_options["reference_files"] = [reference.path]
        base_dir, parent = _base_model(session, ctx, agent, request)
        if request.eval_suite:
            owned(session, EvalSuite, request.eval_suite, agent.id, "eval_suite")
    if base_dir is None:  # pretrain: the model is built in the job, from a preset or an explicit shape
        config = {"max_position_embeddings": methods.context_length(method_options)}
        parameters = methods.pretrain_parameters(method_options)
    else:
        config = modelinfo.read_model_config(base_dir)
        parameters = modelinfo.count_parameters(base_dir)
    lengths = _record_lengths(request.method, base_dir, datasets)
    hyper = _resolve(request, lengths, parameters, config)
    estimate = guardrails.Estimate(
        parameters=parameters,
        tokens_per_step=request.devices * _tokens_per_step(request.method, hyper, method_options, lengths),
        max_steps=hyper.max_steps, dataset_bytes=sum(d.bytes for d in datasets),
        max_seconds=request.limits.max_seconds, flops_per_parameter_token=method.flops_per_parameter_token)

    job = Job(agent_id=agent.id, kind="train", method=request.method, state=JobState.validating,
              request=request.model_dump(mode="json"), idempotency_key=request.idempotency_key,
              request_hash=request_hash, estimate_flops=estimate.flops)
    job.run_dir = str((settings.runs_dir / job.id).resolve())
    job.output_dir = str(Path(job.run_dir) / "output")
    spec = JobSpec(
        job_id=job.id, method=request.method, run_dir=job.run_dir, output_dir=job.output_dir,
        base_model=str(base_dir or ""), train_files=[d.path for d in datasets], hyperparameters=hyper,
        adapter=request.adapter, lora=LoraSpec(**request.lora.model_dump()), merge_adapter=request.merge_adapter,
        limits=Limits(max_seconds=min(request.limits.max_seconds or agent.max_request_seconds, agent.max_request_seconds),
                      max_flops=min(request.limits.max_flops or agent.max_request_flops, agent.max_request_flops),
                      max_tokens=agent.max_request_tokens),
        flops_per_token=method.flops_per_parameter_token * parameters, options=method_options | (options or {}),
        devices=request.devices)
    job.resolved = {
        "spec": json.loads(spec.to_json()), "hyperparameters": json.loads(json.dumps(hyper.__dict__)),
        "estimate": _estimate_view(estimate).model_dump(),
        # A pretrained model starts from nothing but its shape: say so in its lineage.
        "base_model": request.base_model or (
            "scratch:model_config" if method_options.get("model_config") else f"scratch:{method_options.get('preset')}"),
        "parent_model_id": parent.id if parent else None,
        "dataset_ids": [d.id for d in datasets], "dataset_hashes": [d.content_hash for d in datasets],
        "model_name": request.model_name, "eval_suite": request.eval_suite}
    return job, estimate, datasets


def queue_after_snapshot_check(ctx: ServiceContext, job: Job, datasets: list[Dataset]) -> None:
    """validating -> queued once every snapshot still holds the bytes it was registered with.

    Snapshots are read-only copies, so a mismatch means tampering or disk damage: the job fails
    rather than train on data whose hash its lineage would misstate.
    """
    broken = [d for d in datasets if not _hash_matches(Path(d.path), d.content_hash)]
    if broken:
        _fail_validation(ctx, job, f"snapshot of {broken[0].id} no longer matches its hash; upload it again")
    else:
        _end_validation(ctx, job, JobState.queued, None)


def _fail_validation(ctx: ServiceContext, job: Job, message: str) -> None:
    _end_validation(ctx, job, JobState.failed, {"code": "invalid_dataset", "param": "datasets", "message": message})


def _end_validation(ctx: ServiceContext, job: Job, state: str, error: dict[str, Any] | None) -> None:
    with write_transaction(ctx.engine) as session:
        row = session.get(Job, job.id)
        assert row is not None
        if row.state != JobState.validating:  # checked already (see recheck_stale_validations), maybe running
            job.state, job.error = row.state, row.error
            return
        row.state, row.error = state, error
        if state == JobState.failed:
            guardrails.settle(session, row.id, 0.0)
        session.add(row)
    job.state, job.error = row.state, row.error


def recheck_stale_validations(ctx: ServiceContext) -> int:
    """Check the snapshots of jobs left in `validating` by a process that died between inserting them
    and checking their datasets (a check takes seconds, so one older than
    `Settings.validation_stale_seconds` has no process left to finish it); the number checked."""
    with Session(ctx.engine) as session:
        stale = session.exec(select(Job).where(
            Job.state == JobState.validating,
            Job.created_at < time.time() - ctx.settings.validation_stale_seconds)).all()
        checks = [(job, {i: session.get(Dataset, i) for i in job.resolved.get("dataset_ids", [])}) for job in stale]
    for job, by_id in checks:
        missing = [i for i, d in by_id.items() if d is None]
        if missing:  # nothing deletes datasets; a row gone by hand must not leave the job training on the rest
            _fail_validation(ctx, job, f"dataset {missing[0]} no longer exists; launch the job again with the "
                             "datasets you have")
        else:
            queue_after_snapshot_check(ctx, job, [d for d in by_id.values() if d is not None])
    return len(checks)


@dataclass(frozen=True)
class RecordLengths:
    """The training data's size in tokens: what `auto` settings and the estimate are made from."""

    longest: int
    """The longest record, as the trainer sees it where the model's tokenizer could count it."""
    p95: int
    total: int
    records: int


def _record_lengths(method: str, base_dir: Path | None, datasets: list[Dataset]) -> RecordLengths:
    stats = [d.report.get("stats", {}).get("tokens", {}) for d in datasets]
    longest = max(int(s.get("max") or 1) for s in stats)
    p95 = max(int(s.get("p95") or 0) for s in stats)
    total = sum(int(s.get("total") or 0) for s in stats)
    records = sum(d.records for d in datasets)
    if base_dir is not None and method not in PACKED_METHODS:
        # Records are trained chat template and all: count the longest and a sample in the model's
        # tokens. The 95th percentile (which sets `auto` max_seq_length, so records are not cut) is
        # scaled by the larger of the two ratios; the total (packed SFT's steps) by the sample's.
        measured = token_counts.measured_lengths(base_dir, [(Path(d.path), d.report) for d in datasets])
        if measured is not None:
            longest = measured.longest
            p95 = min(longest, math.ceil(p95 * max(measured.longest_ratio, measured.sample_ratio)))
            total = math.ceil(total * measured.sample_ratio)
    return RecordLengths(longest=longest, p95=p95, total=total, records=records)


def _resolve(request: LaunchTrainingRequest, lengths: RecordLengths, parameters: int,
             config: dict[str, Any]) -> ResolvedHyperparameters:
    """Turn every `auto` into a value; the result is stored on the job."""
    h = request.hyperparameters
    small = parameters < 100_000_000
    packed = request.method in PACKED_METHODS
    if h.learning_rate != "auto":
        lr = h.learning_rate
    else:
        lr = 1e-3 if small else (2e-4 if request.adapter == "lora" or packed else 2e-5)
    context = int(config.get("max_position_embeddings") or 2048)
    if h.max_seq_length != "auto":
        if h.max_seq_length > context:
            raise InvalidRequest(f"max_seq_length {h.max_seq_length} is over the model's context of {context}",
                                 param="hyperparameters.max_seq_length")
        seq = h.max_seq_length
    elif packed:
        seq = min(context, 512)  # packed blocks: the corpus is cut to length, records do not set it
    else:
        seq = min(context, 2048, max(64, 2 ** math.ceil(math.log2(max(lengths.p95, 1)))))
    batch = h.per_device_batch_size if h.per_device_batch_size != "auto" else (8 if seq <= 512 else 4)
    # A step's examples: records, or for packed methods (and packed SFT) sequences of `seq` tokens.
    examples = max(1, lengths.total // seq) if packed or _packs_records(request.method, h.packing) \
        else lengths.records
    train_examples = max(1, int(examples * (1 - h.eval_fraction)))
    if h.max_steps != "auto":
        steps = h.max_steps
    else:
        steps = max(1, math.ceil(h.epochs * train_examples / (batch * h.gradient_accumulation_steps * request.devices)))
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


def _packs_records(method: str, packing: bool) -> bool:
    """SFT with `packing` fills each sequence with as many records as fit (TRL's best-fit packing), so
    a step trains on full sequences and an epoch has fewer of them than records. No other method packs."""
    return method == "sft" and packing


def _check_formats(method: str, datasets: list[Dataset]) -> None:
    accepted = methods.METHODS[method].formats
    for index, dataset in enumerate(datasets):
        if dataset.format not in accepted:
            raise InvalidRequest(f"{method} trains on {' or '.join(accepted)} records; dataset {dataset.id} is "
                                 f"{dataset.format}", param=f"datasets[{index}]")


def _tokens_per_step(method: str, hyper: ResolvedHyperparameters, options: dict[str, Any],
                     lengths: RecordLengths) -> int:
    """Tokens one optimizer step trains on, per device (each device trains a batch of its own)."""
    sequences = hyper.per_device_batch_size * hyper.gradient_accumulation_steps
    if method in PACKED_METHODS or _packs_records(method, hyper.packing):
        return sequences * hyper.max_seq_length  # packed: every block is full
    longest = min(hyper.max_seq_length, lengths.longest)
    if method == "dpo":
        return sequences * 2 * longest  # the chosen and the rejected answer
    if method == "grpo":
        if sequences % options["num_generations"]:
            raise InvalidRequest(
                f"per_device_batch_size x gradient_accumulation_steps ({sequences}) must be a multiple of "
                f"options.num_generations ({options['num_generations']}): each prompt's completions form one group",
                param="hyperparameters.per_device_batch_size")
        return sequences * (longest + options["max_completion_length"])
    return sequences * longest


def _base_model(session: Session, ctx: ServiceContext, agent: Agent, request: LaunchTrainingRequest
                ) -> tuple[Path | None, Model | None]:
    ref = request.base_model
    if request.method == "pretrain":
        if ref is not None:
            raise InvalidRequest("pretrain builds a new model from options.preset; to go on training base_model "
                                 "use method continued_pretrain", param="base_model")
        return None, None
    if ref is None:
        raise InvalidRequest(f"{request.method} needs a base_model: a model id (mdl_...) or a model directory",
                             param="base_model")
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


def _validated_options(method: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return methods.options_json(methods.options_model(method, raw))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in ("options", *first["loc"]))
        raise InvalidRequest(f"{where}: {first['msg']} ({method} options)", param=where) from err
