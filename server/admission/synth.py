"""A synth job: the request's shape, and admitting it (it makes, filters and registers a training set).

The request is checked whole before anything starts (every problem reported at once, each naming
its field), priced against the agent's limits (a local model costs 2 x parameters per generated
token; templates and operator endpoints cost none of this machine's compute, but their tokens
still count against the request caps), and admitted in the same transaction that inserts the
job. The child (`training_core.synthetic`) writes the dataset; the executor's `synth` handler
registers it with its lineage, and the job's metrics carry `dataset_id`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import Field, StrictInt
from sqlmodel import Session, select

from server.admission import guardrails, idempotency, snapshots
from server.admission.requests import RequestModel
from server.admission.train import job_limits, model_directory, owned_valid_datasets
from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store.db import write_transaction
from server.store.tables import Agent, Dataset, EvalSuite, Job, JobState, Reservation
from training_core import modelinfo
from training_core.spec import Hyperparameters, JobSpec
from training_core.synthetic.generators import slots_in
from training_core.synthetic.tasks import calls_per_record

Task = Literal["instructions", "qa_from_documents", "preferences", "workflow_traces", "prompts"]
OVERGENERATE = 2
"""Records tried per record asked for: room for what the filters drop, and the cap that ends a job."""
ROUND = 32
"""Records generated between two filter passes and progress events."""
TEMPLATE_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "instructions": (("prompt", "completion"), ("messages",)),
    "qa_from_documents": (("question", "answer"), ("prompt", "completion"), ("messages",)),
    "preferences": (("prompt", "chosen"),),
    "workflow_traces": (("messages",),),
    "prompts": (("prompt",),),
}
"""The fields a template of each task must have (one of the sets)."""


class TemplateGenerator(RequestModel):
    type: Literal["template"] = Field(description="Records filled in from templates.")
    templates: list[dict[str, Any]] = Field(min_length=1, max_length=500, description="Records with {slot}s.")
    slots: dict[str, list[str]] = Field(default_factory=dict, description="Slot -> values.")


class ModelGenerator(RequestModel):
    type: Literal["model"] = Field(description="A local model generates.")
    model: str = Field(description="mdl_..., alias:NAME or a directory in a data root.")
    max_new_tokens: StrictInt = Field(128, ge=1, le=4096, description="Per answer.")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy (repeatable).")
    batch_size: StrictInt = Field(8, ge=1, le=256, description="Prompts at once.")


class EndpointGenerator(RequestModel):
    type: Literal["openai_compatible"] = Field(description="An endpoint the operator set up.")
    endpoint: str = Field(description="Its name.")
    max_new_tokens: StrictInt = Field(256, ge=1, le=8192, description="Per answer.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")


Generator = Annotated[TemplateGenerator | ModelGenerator | EndpointGenerator, Field(discriminator="type")]


class TaskOptions(RequestModel):
    output_format: Literal["messages", "prompt_completion"] = Field("messages", description="Records made.")
    seeds_per_prompt: StrictInt = Field(3, ge=1, le=20, description="Seeds shown per generation.")
    chunk_chars: StrictInt = Field(1000, ge=100, le=20_000, description="qa_from_documents chunk size.")
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=64, description=(
        "workflow_traces: [{name, description, parameters: JSON schema}]."))
    chosen: Literal["generator", "reference"] = Field("generator", description="preferences: chosen from.")
    rejected: Literal["corruption", "model"] = Field("corruption", description="preferences: rejected from.")
    rejected_model: str | None = Field(None, description="With rejected model: a weaker model.")
    system_prompt: str | None = Field(None, description="System turn of the generation prompts.")


class ScoreOptions(RequestModel):
    python: str | None = Field(None, description="Code defining function(records) -> list[float] (sandboxed).")
    function: str = Field("score", description="Its name.")
    judge: str | None = Field(None, description="Or a model rating each record 1-10 (as 0.1-1).")
    threshold: float = Field(description="Lower scores are dropped.")


class SynthFilters(RequestModel):
    near_duplicate: float | None = Field(0.8, gt=0, le=1, description="Word 3-gram Jaccard to drop at; null: off.")
    diversity_rouge_l: float | None = Field(0.7, gt=0, le=1, description="ROUGE-L to drop at; off for templates "
                                            "unless set.")
    min_chars: StrictInt = Field(1, ge=0, description="Shorter are dropped.")
    max_chars: StrictInt = Field(20_000, ge=1, description="Longer are dropped.")
    score: ScoreOptions | None = Field(None, description="Drop records scored low.")


class SynthLimits(RequestModel):
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap.")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Generated tokens cap.")
    max_flops: float | None = Field(None, gt=0, description="Compute cap.")


class SynthRequest(RequestModel):
    """A synth job: the `generate_synthetic_data` fields, without dry_run."""

    task: Task = Field(description="instructions (chats or prompt/completion), qa_from_documents (from sources' "
                       "chunks), preferences, workflow_traces (chats with calls of options.tools), prompts.")
    generator: Generator = Field(description="Who writes the records.")
    num_records: StrictInt = Field(ge=1, description="Records to keep (up to twice as many are tried).")
    sources: list[str] = Field(default_factory=list, max_length=16, description="Dataset ids: seeds or documents.")
    seed_examples: list[dict[str, Any]] = Field(default_factory=list, max_length=500, description=(
        "Records to grow new ones from."))
    options: TaskOptions = Field(default_factory=TaskOptions, description="Task settings.")
    filters: SynthFilters = Field(default_factory=SynthFilters, description="Exact duplicates always go.")
    decontaminate_against: list[str] = Field(default_factory=list, max_length=16, description=(
        "Dataset ids whose 13-word runs drop a record (your eval suites always do)."))
    seed: StrictInt = Field(0, ge=0, description="Same request and seed, same dataset.")
    limits: SynthLimits = Field(default_factory=SynthLimits, description="At a cap the job keeps what it made.")
    dataset_name: str | None = Field(None, max_length=200, description="Name of the registered dataset.")


@dataclass(frozen=True)
class SynthPrice:
    """What a synth request will cost: compute, and the tokens it may generate."""

    estimate: guardrails.Estimate
    tokens: int


def build_synth_job(ctx: ServiceContext, agent: Agent, request: SynthRequest) -> tuple[Job, SynthPrice,
                                                                                      list[Dataset]]:
    """Validate and price a synth request into an unsaved `validating` job with its spec."""
    settings = ctx.settings
    _check(request, ctx)
    with Session(ctx.engine) as session:
        sources = owned_valid_datasets(session, agent.id, request.sources, "sources") if request.sources else []
        decontaminate = owned_valid_datasets(session, agent.id, request.decontaminate_against,
                                             "decontaminate_against") if request.decontaminate_against else []
        suites = _eval_suites(session, agent.id)
        generator = _resolved_generator(session, ctx, agent, request.generator.model_dump(), "generator")
        rejected = None
        if request.task == "preferences" and request.options.rejected == "model":
            weaker = {"type": "model", "model": request.options.rejected_model, "temperature": 0.0, "batch_size": 8,
                      "max_new_tokens": generator.get("max_new_tokens", 128)}
            rejected = _resolved_generator(session, ctx, agent, weaker, "options.rejected_model")
        score = request.filters.score.model_dump() if request.filters.score else None
        if score and score["judge"]:
            score["judge"] = _resolved_generator(session, ctx, agent, {"type": "model", "model": score["judge"],
                                                                "max_new_tokens": 4, "temperature": 0.0,
                                                                "batch_size": 8}, "filters.score.judge")

    options: dict[str, Any] = {
        "task": request.task, "num_records": request.num_records, "max_generated": OVERGENERATE * request.num_records,
        "seed": request.seed, "batch_size": ROUND, "generator": generator, "rejected_generator": rejected,
        "task_options": request.options.model_dump(), "filters": {**_filters(request), "score": score},
        "seed_examples": request.seed_examples, "sources": [_source(d) for d in sources],
        "decontaminate": [_source(d) for d in decontaminate], "decontaminate_suites": suites,
    }
    parameters = max([g.get("parameters", 0) for g in (generator, rejected, (score or {}).get("judge")) if g] or [0])
    tokens_per_record = OVERGENERATE * calls_per_record(request.task, options) * generator.get("max_new_tokens", 0)
    estimate = guardrails.Estimate(
        parameters=parameters, tokens_per_step=max(1, tokens_per_record), max_steps=request.num_records,
        dataset_bytes=sum(d.bytes for d in sources), max_seconds=request.limits.max_seconds,
        flops_per_parameter_token=2.0, unit="num_records")
    view = {"records": request.num_records, "max_generated": options["max_generated"], "parameters": parameters,
            "tokens": estimate.tokens if tokens_per_record else 0, "flops": estimate.flops}
    max_tokens = min(request.limits.max_tokens or settings.synth_max_tokens, settings.synth_max_tokens,
                     agent.max_request_tokens)
    if view["tokens"] > settings.synth_max_tokens:
        fit = settings.synth_max_tokens // max(1, tokens_per_record)
        raise InvalidRequest(f"up to {view['tokens']:,} generated tokens is over the service's cap of "
                             f"{settings.synth_max_tokens:,} per request: num_records <= {fit} fits, or lower "
                             "generator.max_new_tokens", param="num_records")
    job = Job(agent_id=agent.id, kind="synth", method="synth", state=JobState.validating,
              request=request.model_dump(mode="json"), estimate_flops=estimate.flops)
    job.run_dir = str((settings.runs_dir / job.id).resolve())
    job.output_dir = str(Path(job.run_dir) / "output")
    spec = JobSpec(
        job_id=job.id, method="synth", run_dir=job.run_dir, output_dir=job.output_dir,
        base_model=generator.get("model_dir", ""), train_files=[d.path for d in sources],
        # The spec's training fields, read as a synth job means them: records as steps, a round as the batch.
        hyperparameters=Hyperparameters(learning_rate=0.0, max_steps=options["max_generated"],
                                        per_device_batch_size=ROUND, gradient_accumulation_steps=1,
                                        max_seq_length=generator.get("max_new_tokens", 0), seed=request.seed),
        limits=dataclasses.replace(job_limits(agent, request.limits.max_seconds, request.limits.max_flops),
                                   max_tokens=max_tokens),
        flops_per_token=2.0 * parameters, options=options)
    job.resolved = {"spec": json.loads(spec.to_json()), "estimate": view,
                    "dataset_ids": [d.id for d in sources + decontaminate],  # what the snapshot check reads
                    "dataset_name": request.dataset_name, "datasets_dir": str(settings.datasets_dir.resolve()),
                    "max_record_bytes": settings.max_record_bytes}
    return job, SynthPrice(estimate, view["tokens"]), sources + decontaminate


def admit_synth(ctx: ServiceContext, agent: Agent, request: SynthRequest, origin: dict[str, Any] | None = None
                ) -> tuple[Job, SynthPrice]:
    """Build, admit and queue a synth job; the job runs on a worker and this returns at once. `origin`
    links it to what started it, with the key that keeps a firing or a step to one job."""
    job, price, datasets = build_synth_job(ctx, agent, request)
    job.request_hash = idempotency.request_hash(request)
    idempotency.link(job, origin)
    with write_transaction(ctx.engine) as session:
        if job.idempotency_key:
            existing = idempotency.existing_in(session, agent.id, job.idempotency_key, job.request_hash)
            if existing is not None:
                return existing, price
        verdict = guardrails.admit(session, ctx.engine, agent.id, price.estimate)
        guardrails.raise_if_refused(verdict, price.estimate)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=price.estimate.flops))
    snapshots.queue_after_check(ctx.engine, job, datasets)
    ctx.wake_workers()
    return job, price


def _filters(request: SynthRequest) -> dict[str, Any]:
    filters = request.filters.model_dump()
    if isinstance(request.generator, TemplateGenerator) and "diversity_rouge_l" not in request.filters.model_fields_set:
        filters["diversity_rouge_l"] = None  # records of one template always share most of their words
    return filters


def _eval_suites(session: Session, agent_id: str) -> list[dict[str, Any]]:
    """Every eval suite the agent owns, with its items' snapshot: generated records that share a
    13-word run with an item are dropped, and the dataset's lineage names the suites by id and hash."""
    found = []
    for suite in session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id)).all():
        dataset = session.get(Dataset, suite.dataset_id)
        if dataset is not None:
            found.append({"suite_id": suite.id, "name": suite.name, "content_hash": suite.content_hash,
                          "dataset_id": dataset.id, "dataset_hash": dataset.content_hash, "path": dataset.path})
    return found


def _check(request: SynthRequest, ctx: ServiceContext) -> None:
    """Every problem of the request at once, each naming its field; nothing has started yet."""
    problems: list[tuple[str, str]] = []
    settings, task, gen, opts = ctx.settings, request.task, request.generator, request.options
    if request.num_records > settings.synth_max_records:
        problems.append(("num_records", f"{request.num_records} is over the cap of {settings.synth_max_records}"))
    if isinstance(gen, EndpointGenerator) and gen.endpoint not in settings.synth_endpoints:
        configured = ", ".join(sorted(settings.synth_endpoints)) or "none are configured"
        problems.append(("generator.endpoint", (f"{gen.endpoint!r} is not an endpoint the operator configured "
                         f"({configured}); use one of those, or the template or model generator")))
    if isinstance(gen, TemplateGenerator):
        problems += _template_problems(task, gen, bool(request.seed_examples or request.sources))
    elif task in ("instructions", "prompts", "preferences") and not (request.seed_examples or request.sources):
        problems.append(("seed_examples", (f"{task} with a {gen.type} generator grows new examples from seeds: "
                         "give seed_examples or sources holding examples")))
    if (task == "preferences" and opts.chosen == "reference" and not request.sources
            and not any({"completion", "chosen", "messages"} & set(seed) for seed in request.seed_examples)):
        problems.append(("options.chosen", ('"reference" takes the chosen answer from seed examples: give seeds '
                         'with "completion" (or chat "messages"), or sources holding them')))
    if task == "qa_from_documents" and not request.sources:
        problems.append(("sources", "qa_from_documents needs the ids of datasets holding the documents"))
    if task == "workflow_traces":
        problems += _tool_problems(opts.tools)
    if task == "preferences" and opts.rejected == "model" and not opts.rejected_model:
        problems.append(("options.rejected_model", 'rejected="model" needs rejected_model (a weaker model)'))
    if task == "preferences" and opts.rejected == "model" and isinstance(gen, TemplateGenerator):
        problems.append(("options.rejected",
                         'templates make rejected answers by corruption; use rejected="corruption"'))
    score = request.filters.score
    if score is not None and (score.python is None) == (score.judge is None):
        problems.append(("filters.score", "give exactly one of python (a sandboxed function) or judge (a model)"))
    for index, seed in enumerate(request.seed_examples):
        if not ({"prompt", "messages"} & set(seed)):
            problems.append((f"seed_examples[{index}]", ('a seed needs "prompt" (with "completion" or "chosen") '
                             'or "messages"')))
    if problems:
        raise InvalidRequest("; ".join(f"{param}: {message}" for param, message in problems), param=problems[0][0])


def _template_problems(task: str, gen: TemplateGenerator, has_seeds: bool) -> list[tuple[str, str]]:
    problems = []
    builtin = {"chunk", "sentence"} if task == "qa_from_documents" else (
        {"seed_prompt", "seed_completion"} if has_seeds else set())
    for name, values in gen.slots.items():
        if not values:
            problems.append((f"generator.slots.{name}", "has no values; give at least one"))
    for index, template in enumerate(gen.templates):
        where = f"generator.templates[{index}]"
        wanted = TEMPLATE_FIELDS[task]
        if not any(all(k in template for k in fields) for fields in wanted):
            shown = " or ".join("+".join(fields) for fields in wanted)
            has = ", ".join(template) or "none"
            problems.append((where, f"a {task} template needs the fields {shown}; it has {has}"))
        missing = slots_in(template) - set(gen.slots) - builtin
        if missing:
            problems.append((where, f"uses slots {', '.join(sorted(missing))} that generator.slots does not define"
                             + (" (the task fills chunk and sentence itself)" if task == "qa_from_documents" else "")))
    return problems


def _tool_problems(tools: list[dict[str, Any]]) -> list[tuple[str, str]]:
    if not tools:
        return [("options.tools", 'workflow_traces needs the company\'s tools: [{"name", "parameters": JSON schema}]')]
    problems = []
    for index, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            problems.append((f"options.tools[{index}].name", "each tool needs a name"))
        try:
            jsonschema.Draft202012Validator.check_schema(tool.get("parameters") or {})
        except jsonschema.SchemaError as err:
            problems.append((f"options.tools[{index}].parameters", f"not a valid JSON schema: {err.message}"))
    return problems



def _resolved_generator(session: Session, ctx: ServiceContext, agent: Agent, raw: dict[str, Any],
                        param: str) -> dict[str, Any]:
    """The generator as the child runs it: a model's directory and size, an endpoint's settings (no key)."""
    if raw["type"] == "template":
        return {**raw, "describe": "template"}
    if raw["type"] == "openai_compatible":
        endpoint = ctx.settings.synth_endpoints[raw["endpoint"]]
        config = {"name": raw["endpoint"], **endpoint.model_dump()}
        return {**raw, "endpoint_config": config, "describe": f"openai_compatible:{raw['endpoint']}:{endpoint.model}"}
    ref = raw["model"]
    model_dir, _ = model_directory(session, ctx, agent.id, ref, param, "generate with it")
    return {**raw, "model_dir": str(model_dir), "parameters": modelinfo.count_parameters(model_dir),
            "describe": f"model:{ref if ref.startswith('mdl_') else model_dir.name}"}



def _source(dataset: Dataset) -> dict[str, Any]:
    return {"dataset_id": dataset.id, "content_hash": dataset.content_hash, "path": dataset.path}
