"""A train job: the request's shape, and building it into a priced, admitted job.

`TrainRequest` is what any caller asks for (the `launch_training` tool, a study's template, a
schedule's or a pipeline's train step); `build_train_job` validates it against the agent's objects
and the method's options, resolves every `auto`, prices it and returns an unsaved `validating` job
with its spec; `admit_train` inserts it with its reservation in one transaction. Every problem of a
request is reported at once, each naming its field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, ValidationError
from sqlmodel import Session

from server.admission import guardrails, idempotency, snapshots
from server.admission.datasets import resolve_in_roots
from server.admission.requests import RequestModel
from server.context import ServiceContext
from server.errors import InvalidDataset, InvalidRequest, problems_of
from server.store import aliases
from server.store.db import owned, write_transaction
from server.store.tables import Agent, Dataset, EvalSuite, Job, JobState, Model, Reservation
from training_core import methods, modelinfo, token_counts
from training_core.spec import Hyperparameters as ResolvedHyperparameters
from training_core.spec import JobSpec, Limits, LoraSpec

Auto = Literal["auto"]
LEARNING_RATE_RANGE = (1e-7, 1.0)
"""Outside it a run diverges or learns nothing: refused rather than trained (a 1e308 ran to 'success')."""


class Hyperparameters(RequestModel):
    learning_rate: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="Peak, 1e-7 to 1; auto: by size and adapter.")
    max_steps: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | Auto = Field(
        "auto", description="Optimizer steps; auto: epochs over the data.")
    epochs: float = Field(3.0, gt=0, le=100, description="Used when max_steps is auto.")
    per_device_batch_size: Annotated[StrictInt, Field(ge=1, le=1024)] | Auto = Field(
        "auto", description="Per device and step; auto: 8 (4 over 512 tokens).")
    gradient_accumulation_steps: StrictInt = Field(1, ge=1, le=1024, description="Batches summed into one step.")
    max_seq_length: Annotated[StrictInt, Field(ge=16, le=131072)] | Auto = Field(
        "auto", description="Tokens per sequence; auto: fits the records.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps warming up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1, description="Seeds the split, shuffling and init.")
    eval_fraction: float = Field(0.1, ge=0, lt=0.5, description="Held out for validation loss.")
    save_steps: Annotated[StrictInt, Field(ge=1)] | Auto = Field(
        "auto", description="Checkpoint interval; auto: 5 a run.")
    packing: StrictBool = Field(False, description="SFT: several records a sequence, none seeing another.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where measured faster.")
    padding_free: StrictBool = Field(True, description="SFT: records unpadded, end to end.")
    gradient_checkpointing: StrictBool = Field(False, description="Less memory, 8/6 the compute.")
    liger_kernels: StrictBool = Field(True, description="GPU: Liger kernels if installed.")


class LoraOptions(RequestModel):
    r: StrictInt = Field(16, ge=1, le=1024, description="Rank.")
    alpha: StrictInt = Field(32, ge=1, le=4096, description="Scale, alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules adapted.")


class RequestLimits(RequestModel):
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap (the job stops, checkpoint kept).")
    max_flops: float | None = Field(None, gt=0, description="Compute cap (same).")


class TrainRequest(RequestModel):
    """What a train job is asked to do: the `launch_training` fields, without dry_run and the key."""

    method: methods.MethodName = Field("sft", description="; ".join(
        f"{name}: {m.summary}" for name, m in methods.METHODS.items()) + ".")
    base_model: str | None = Field(None, description="Model to start from: mdl_..., alias:NAME or a directory in "
                                   "a data root; none for pretrain.")
    datasets: list[str] = Field(min_length=1, max_length=16, description="Dataset ids (ds_...), one record format.")
    adapter: Literal["auto", "full", "lora"] = Field(
        "auto", description="auto: full for pretrain and continued_pretrain, lora otherwise.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Any may be auto.")
    lora: LoraOptions | None = Field(None, description="With adapter lora.")
    merge_adapter: StrictBool = Field(False, description="With lora: also save merged weights.")
    options: dict[str, Any] | None = Field(None, description="The method's options: " + methods.describe_options())
    devices: StrictInt = Field(1, ge=1, le=1024, description="GPUs (or CPU processes) training data parallel.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Caps for this job.")
    model_name: str | None = Field(None, max_length=120, description="Name of the registered model.")
    eval_suite: str | None = Field(None, description="Suite id: when done, evaluate the model against its parent.")


def adapter_of(request: TrainRequest) -> str:
    return methods.METHODS[request.method].default_adapter if request.adapter == "auto" else request.adapter


def check_train_request(request: TrainRequest) -> dict[str, Any]:
    """Everything wrong with the request that needs no database, all at once; the method's options
    as plain JSON with their defaults when there is nothing wrong."""
    problems: list[tuple[str, str]] = []
    method = methods.METHODS[request.method]
    options: dict[str, Any] = {}
    try:
        options = methods.options_json(methods.options_model(request.method, request.options))
    except ValidationError as err:
        problems += [(param, f"{message} ({request.method} options)")
                     for param, message in problems_of(err, "options.")]
    adapter = adapter_of(request)
    if adapter not in method.adapters:
        problems.append(("adapter", (f"{request.method} trains a new model, so every weight: use adapter full "
                                    "(or auto); a LoRA adapter needs a base model to sit on")))
    if request.lora is not None and adapter != "lora":
        problems.append(("lora", (f"LoRA settings are for adapter lora, and this request trains {adapter} "
                                 "weights: set adapter to lora or drop lora")))
    if request.merge_adapter and adapter != "lora":
        problems.append(("merge_adapter", ("only a LoRA adapter is merged: set adapter to lora or drop "
                                          "merge_adapter")))
    if request.method == "pretrain" and request.base_model is not None:
        problems.append(("base_model", ("pretrain builds a new model from options.preset; to go on training "
                                       "base_model use method continued_pretrain")))
    if method.needs_base_model and request.base_model is None:
        problems.append(("base_model", (f"{request.method} needs a base_model: a model id (mdl_...), an alias "
                                       "(alias:NAME) or a model directory")))
    lr = request.hyperparameters.learning_rate
    if lr != "auto" and not LEARNING_RATE_RANGE[0] <= lr <= LEARNING_RATE_RANGE[1]:
        problems.append(("hyperparameters.learning_rate", (f"{lr:g} is outside the plausible range "
                         f"{LEARNING_RATE_RANGE[0]:g} to {LEARNING_RATE_RANGE[1]:g}; pick a value in it or auto")))
    if problems:
        raise InvalidRequest.of(problems)
    return options


@dataclass(frozen=True)
class BuiltJob:
    """An unsaved `validating` job, its price, and the datasets whose snapshots it checks."""

    job: Job
    estimate: guardrails.Estimate
    datasets: list[Dataset]


def build_train_job(ctx: ServiceContext, agent: Agent, request: TrainRequest, request_hash: str = "",
                    extra_options: dict[str, Any] | None = None) -> BuiltJob:
    """Validate and price a train request into an unsaved `validating` job with its spec.
    `extra_options` (the service's own, such as a study trial's `eval_steps`) join the method's."""
    method_options = check_train_request(request)
    method = methods.METHODS[request.method]
    adapter = adapter_of(request)
    # A process without workers knows the workers' devices only where the operator set max_devices.
    most = ctx.executor.max_devices() if ctx.executor else ctx.settings.max_devices
    if most is not None and request.devices > most:
        raise InvalidRequest(f"{request.devices} devices is more than the workers can give one job "
                             f"({most}); ask for at most that", param="devices")
    with Session(ctx.engine) as session:
        datasets = owned_valid_datasets(session, agent.id, request.datasets, "datasets")
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
    hyper = _resolve(request, adapter, lengths, parameters, config)
    # Recomputing the forward pass in backward costs one more forward: 2 FLOPs per parameter and token.
    flops_per_parameter_token = method.flops_per_parameter_token + (2.0 if hyper.gradient_checkpointing else 0.0)
    estimate = guardrails.Estimate(
        parameters=parameters,
        tokens_per_step=request.devices * _tokens_per_step(request.method, hyper, method_options, lengths),
        max_steps=hyper.max_steps, dataset_bytes=sum(d.bytes for d in datasets),
        max_seconds=request.limits.max_seconds, flops_per_parameter_token=flops_per_parameter_token)

    job = Job(agent_id=agent.id, kind="train", method=request.method, state=JobState.validating,
              request=request.model_dump(mode="json"), request_hash=request_hash, estimate_flops=estimate.flops)
    job.run_dir = str((ctx.settings.runs_dir / job.id).resolve())
    job.output_dir = str(Path(job.run_dir) / "output")
    lora = request.lora or LoraOptions()
    spec = JobSpec(
        job_id=job.id, method=request.method, run_dir=job.run_dir, output_dir=job.output_dir,
        base_model=str(base_dir or ""), train_files=[d.path for d in datasets], hyperparameters=hyper,
        adapter=adapter, lora=LoraSpec(**lora.model_dump()), merge_adapter=request.merge_adapter,
        limits=job_limits(agent, request.limits.max_seconds, request.limits.max_flops),
        flops_per_token=flops_per_parameter_token * parameters,
        options=method_options | (extra_options or {}), devices=request.devices)
    job.resolved = {
        "spec": json.loads(spec.to_json()), "hyperparameters": json.loads(json.dumps(hyper.__dict__)),
        "estimate": guardrails.estimate_json(estimate),
        # A pretrained model starts from nothing but its shape: say so in its lineage.
        "base_model": (parent.id if parent else request.base_model) or (
            "scratch:model_config" if method_options.get("model_config")
            else f"scratch:{method_options.get('preset')}"),
        "parent_model_id": parent.id if parent else None,
        "dataset_ids": [d.id for d in datasets], "dataset_hashes": [d.content_hash for d in datasets],
        "model_name": request.model_name, "eval_suite": request.eval_suite}
    return BuiltJob(job, estimate, datasets)


def admit_train(ctx: ServiceContext, agent: Agent, request: TrainRequest, idempotency_key: str | None = None,
                origin: dict[str, Any] | None = None) -> Job:
    """Build, admit and queue a train job; a retry with the same key returns the same job. `origin`
    links it to what started it (`schedule_id`, `pipeline_job_id`, `pipeline_step`)."""
    request_hash = idempotency.request_hash(request)
    if idempotency_key:
        existing = idempotency.existing_job(ctx.engine, agent.id, idempotency_key, request_hash)
        if existing is not None:
            return existing
    built = build_train_job(ctx, agent, request, request_hash)
    built.job.idempotency_key = idempotency_key
    idempotency.link(built.job, origin)
    return insert_admitted(ctx, agent, built)


def insert_admitted(ctx: ServiceContext, agent: Agent, built: BuiltJob) -> Job:
    """Admit a built job against the agent's limits and insert it with its reservation, in one
    transaction; then check its snapshots and queue it. LimitExceeded names the limit."""
    job = built.job
    with write_transaction(ctx.engine) as session:
        if job.idempotency_key:  # checked again under the write lock: two retries may race here
            existing = idempotency.existing_in(session, agent.id, job.idempotency_key, job.request_hash)
            if existing is not None:
                return existing
        verdict = guardrails.admit(session, ctx.engine, agent.id, built.estimate)
        guardrails.raise_if_refused(verdict, built.estimate)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=built.estimate.flops))
    snapshots.queue_after_check(ctx.engine, job, built.datasets)
    ctx.wake_workers()
    return job


def job_limits(agent: Agent, max_seconds: float | None, max_flops: float | None) -> Limits:
    """The caps a job's child enforces: the request's, never above the agent's per-request ones."""
    return Limits(max_seconds=min(max_seconds or agent.max_request_seconds, agent.max_request_seconds),
                  max_flops=min(max_flops or agent.max_request_flops, agent.max_request_flops),
                  max_tokens=agent.max_request_tokens)


def owned_valid_datasets(session: Session, agent_id: str, ids: list[str], param: str) -> list[Dataset]:
    """The agent's datasets by id, each valid, in one record format."""
    found = []
    for index, dataset_id in enumerate(ids):
        dataset = owned(session, Dataset, dataset_id, agent_id, f"{param}[{index}]")
        if not dataset.valid:
            problems = dataset.report.get("problems", [])[:3]
            where = "; ".join(f"line {p.get('line')}: {p.get('message')}" for p in problems)
            raise InvalidDataset(f"dataset {dataset_id} failed validation ({where}); fix the file and upload it "
                                 "again", param=f"{param}[{index}]")
        found.append(dataset)
    return found


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
    if base_dir is not None and not methods.METHODS[method].packed:
        # Records are trained chat template and all: count the longest and a sample in the model's
        # tokens. The 95th percentile (which sets `auto` max_seq_length, so records are not cut) is
        # scaled by the larger of the two ratios; the total (packed SFT's steps) by the sample's.
        measured = token_counts.measured_lengths(base_dir, [(Path(d.path), d.report) for d in datasets])
        if measured is not None:
            longest = measured.longest
            p95 = min(longest, math.ceil(p95 * max(measured.longest_ratio, measured.sample_ratio)))
            total = math.ceil(total * measured.sample_ratio)
    return RecordLengths(longest=longest, p95=p95, total=total, records=records)


def _resolve(request: TrainRequest, adapter: str, lengths: RecordLengths, parameters: int,
             config: dict[str, Any]) -> ResolvedHyperparameters:
    """Turn every `auto` into a value; the result is stored on the job."""
    h = request.hyperparameters
    small = parameters < 100_000_000
    packed = methods.METHODS[request.method].packed
    if h.learning_rate != "auto":
        lr = h.learning_rate
    else:
        lr = 1e-3 if small else (2e-4 if adapter == "lora" or packed else 2e-5)
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
        save_steps=save_steps, packing=h.packing, precision=h.precision, padding_free=h.padding_free,
        gradient_checkpointing=h.gradient_checkpointing, liger_kernels=h.liger_kernels)


def _packs_records(method: str, packing: bool) -> bool:
    """SFT with `packing` fills each sequence with as many records as fit (TRL's best-fit packing), so
    a step trains on full sequences and an epoch has fewer of them than records. No other method packs."""
    return method == "sft" and packing


def _check_formats(method: str, datasets: list[Dataset]) -> None:
    accepted = methods.METHODS[method].formats
    problems = [(f"datasets[{index}]", (f"{method} trains on {' or '.join(accepted)} records; dataset "
                 f"{dataset.id} is {dataset.format}")) for index, dataset in enumerate(datasets)
                if dataset.format not in accepted]
    formats = {d.format for d in datasets}
    if not problems and len(formats) > 1:
        problems.append(("datasets", (f"datasets mix formats {sorted(f or '?' for f in formats)}; train on one "
                                     "format at a time")))
    if problems:
        raise InvalidRequest.of(problems)


def _tokens_per_step(method: str, hyper: ResolvedHyperparameters, options: dict[str, Any],
                     lengths: RecordLengths) -> int:
    """Tokens one optimizer step trains on, per device (each device trains a batch of its own)."""
    sequences = hyper.per_device_batch_size * hyper.gradient_accumulation_steps
    if methods.METHODS[method].packed or _packs_records(method, hyper.packing):
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


def _base_model(session: Session, ctx: ServiceContext, agent: Agent, request: TrainRequest
                ) -> tuple[Path | None, Model | None]:
    if request.base_model is None:
        return None, None
    return model_directory(session, ctx, agent.id, request.base_model, "base_model", "train on it")


def model_directory(session: Session, ctx: ServiceContext, agent_id: str, ref: str, param: str, purpose: str
                    ) -> tuple[Path, Model | None]:
    """A model to load whole: a registered one (by id or alias, with full or merged weights), or a model
    directory inside a data root. `purpose` finishes the refusal of a LoRA adapter without a merged copy."""
    model = aliases.resolve_model(session, agent_id, ref, param)
    if model is not None:
        if model.adapter == "lora" and not model.merged_path:
            raise InvalidRequest(f"{ref} is a LoRA adapter without a merged copy; train it again with "
                                 f"merge_adapter=true to {purpose}", param=param)
        return Path(model.merged_path or model.path), model
    directory = resolve_in_roots(ctx.settings, ref, param)
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"{ref!r} is not a Hugging Face model directory (no config.json)", param=param)
    return directory, None
