"""generate_synthetic_data: start a synth job that makes, filters and registers a training set.

The request is checked whole before anything starts (every problem reported at once, each naming
its field), priced against the agent's limits (a local model costs 2 x parameters per generated
token; templates and operator endpoints cost none of this machine's compute, but their tokens
still count against the request caps), and admitted in the same transaction that inserts the
job. The child (`training_core.synthetic`) writes the dataset; the executor's `synth` handler
registers it with its lineage, and the job's metrics carry `dataset_id`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import ConfigDict, Field, ValidationError
from sqlmodel import Session, select

from server.admission import guardrails
from server.admission.datasets import resolve_in_roots
from server.context import ServiceContext
from server.errors import InvalidDataset, InvalidRequest
from server.store.db import owned, write_transaction
from server.store.tables import Agent, Dataset, EvalSuite, Job, JobState, Model, Reservation
from tools.launch_training import queue_after_snapshot_check
from tools.views import Compact
from training_core import data, modelinfo
from training_core.spec import Hyperparameters, JobSpec, Limits
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


class TemplateGenerator(Compact):
    model_config = ConfigDict(extra="forbid")
    type: Literal["template"]
    templates: list[dict[str, Any]] = Field(min_length=1, max_length=500)
    slots: dict[str, list[str]] = Field(default_factory=dict)


class ModelGenerator(Compact):
    model_config = ConfigDict(extra="forbid")
    type: Literal["model"]
    model: str = Field(description="A registered model id (mdl_...) or a local HF directory inside a data root.")
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy, so the same request repeats exactly.")
    batch_size: int = Field(8, ge=1, le=256)


class EndpointGenerator(Compact):
    model_config = ConfigDict(extra="forbid")
    type: Literal["openai_compatible"]
    endpoint: str = Field(description="The name of an endpoint the operator configured.")
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)


Generator = Annotated[TemplateGenerator | ModelGenerator | EndpointGenerator, Field(discriminator="type")]


class TaskOptions(Compact):
    model_config = ConfigDict(extra="forbid")
    output_format: Literal["messages", "prompt_completion"] = "messages"
    seeds_per_prompt: int = Field(3, ge=1, le=20)
    chunk_chars: int = Field(1000, ge=100, le=20_000)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=64,
                                        description='workflow_traces: [{"name", "description", "parameters": JSON schema}]')
    chosen: Literal["generator", "reference"] = "generator"
    rejected: Literal["corruption", "model"] = "corruption"
    rejected_model: str | None = None
    system_prompt: str | None = None


class ScoreOptions(Compact):
    model_config = ConfigDict(extra="forbid")
    python: str | None = Field(None, description="Code defining `function(records) -> list[float]`, run sandboxed.")
    function: str = "score"
    judge: str | None = Field(None, description="A model (id or directory) that rates each record 1-10 (as 0.1-1).")
    threshold: float


class SynthFilters(Compact):
    model_config = ConfigDict(extra="forbid")
    near_duplicate: float | None = Field(0.8, gt=0, le=1, description="MinHash Jaccard; null turns it off.")
    diversity_rouge_l: float | None = Field(0.7, gt=0, le=1, description="Drop above this ROUGE-L; null: off. "
                                            "Off unless set for templates, whose records differ only in slots.")
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(20_000, ge=1)
    score: ScoreOptions | None = None


class SynthLimits(Compact):
    model_config = ConfigDict(extra="forbid")
    max_seconds: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1, description="Generated tokens; the job stops there, partial.")
    max_flops: float | None = Field(None, gt=0)


class SynthRequest(Compact):
    model_config = ConfigDict(extra="forbid")
    task: Task
    generator: Generator
    num_records: int = Field(ge=1)
    sources: list[str] = Field(default_factory=list, max_length=16, description="Dataset ids: seeds or documents.")
    seed_examples: list[dict[str, Any]] = Field(default_factory=list, max_length=500)
    options: TaskOptions = TaskOptions()
    filters: SynthFilters = SynthFilters()
    decontaminate_against: list[str] = Field(default_factory=list, max_length=16)
    seed: int = 0
    limits: SynthLimits = SynthLimits()
    dataset_name: str | None = Field(None, max_length=200)
    dry_run: bool = False


class SynthLaunch(Compact):
    # A started synth job ("" for job_id and state on a dry run), or a dry run's verdict. No docstring:
    # it would become the output schema's description, read by every model that lists the tools.
    admitted: bool
    job_id: str = ""
    state: str = ""
    estimate_tokens: int
    estimate_flops: float
    refusal: str = ""


LIFTED_OPTIONS = ("filters", "limits", "decontaminate_against", "dataset_name")
"""Request fields the MCP tool takes inside `options`, to keep its schema short."""


def parse_request(raw: dict[str, Any]) -> SynthRequest:
    """The request from tool arguments (with `filters`, `limits`, ... inside `options`), or
    InvalidRequest naming every field that is wrong."""
    options = dict(raw.get("options") or {})
    lifted = {key: options.pop(key) for key in LIFTED_OPTIONS if key in options}
    try:
        return SynthRequest.model_validate({**raw, **lifted, "options": options})
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        first = ".".join(str(p) for p in err.errors()[0]["loc"])
        raise InvalidRequest("; ".join(problems), param=first) from err


def generate_synthetic_data(ctx: ServiceContext, agent: Agent, request: SynthRequest) -> SynthLaunch:
    """Validate, price and admit a synth request; the job runs on a worker and this returns at once."""
    settings = ctx.settings
    _check(request, ctx)
    with Session(ctx.engine) as session:
        sources = _owned_datasets(session, agent, request.sources, "sources")
        decontaminate = _owned_datasets(session, agent, request.decontaminate_against, "decontaminate_against")
        eval_texts = _eval_suite_items(session, agent.id)
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
        "decontaminate": [_source(d) for d in decontaminate], "decontaminate_texts": eval_texts,
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
    if request.dry_run:
        with Session(ctx.engine) as session:
            verdict = guardrails.admit(session, ctx.engine, agent.id, estimate)
        return SynthLaunch(admitted=verdict.admitted, estimate_tokens=view["tokens"], estimate_flops=estimate.flops,
                           refusal=verdict.message or "")

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
        limits=Limits(max_seconds=min(request.limits.max_seconds or agent.max_request_seconds, agent.max_request_seconds),
                      max_flops=min(request.limits.max_flops or agent.max_request_flops, agent.max_request_flops),
                      max_tokens=max_tokens),
        flops_per_token=2.0 * parameters, options=options)
    job.resolved = {"spec": json.loads(spec.to_json()), "estimate": view,
                    "dataset_ids": [d.id for d in sources + decontaminate],  # what the snapshot check reads
                    "dataset_name": request.dataset_name, "datasets_dir": str(settings.datasets_dir.resolve()),
                    "max_record_bytes": settings.max_record_bytes}
    with write_transaction(ctx.engine) as session:
        verdict = guardrails.admit(session, ctx.engine, agent.id, estimate)
        guardrails.raise_if_refused(verdict, estimate)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=estimate.flops))
    queue_after_snapshot_check(ctx, job, sources + decontaminate)
    ctx.wake_workers()
    return SynthLaunch(admitted=True, job_id=job.id, state=job.state, estimate_tokens=view["tokens"],
                       estimate_flops=estimate.flops)


def _filters(request: SynthRequest) -> dict[str, Any]:
    filters = request.filters.model_dump()
    if isinstance(request.generator, TemplateGenerator) and "diversity_rouge_l" not in request.filters.model_fields_set:
        filters["diversity_rouge_l"] = None  # records of one template always share most of their words
    return filters


def _eval_suite_items(session: Session, agent_id: str) -> list[str]:
    """The texts of the records behind every eval suite the agent owns (prompt and reference):
    generated records that share a 13-word sequence with one are dropped."""
    suites = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id)).all()
    texts: list[str] = []
    for dataset_id in sorted({suite.dataset_id for suite in suites}):
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            continue
        for _, record in data.read_records(Path(dataset.path)):
            if isinstance(record, dict):
                with contextlib.suppress(KeyError, TypeError):  # a suite's records were validated; be safe
                    texts.append(data.record_text(record))
    return texts


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
        problems.append(("options.rejected", 'templates make rejected answers by corruption; use rejected="corruption"'))
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
            problems.append((where, f"a {task} template needs the fields {shown}; it has {', '.join(template) or 'none'}"))
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


def _owned_datasets(session: Session, agent: Agent, ids: list[str], param: str) -> list[Dataset]:
    found = []
    for index, dataset_id in enumerate(ids):
        dataset = owned(session, Dataset, dataset_id, agent.id, f"{param}[{index}]")
        if not dataset.valid:
            raise InvalidDataset(f"dataset {dataset_id} failed validation; fix it and upload it again",
                                 param=f"{param}[{index}]")
        found.append(dataset)
    return found


def _resolved_generator(session: Session, ctx: ServiceContext, agent: Agent, raw: dict[str, Any], param: str) -> dict[str, Any]:
    """The generator as the child runs it: a model's directory and size, an endpoint's settings (no key)."""
    if raw["type"] == "template":
        return {**raw, "describe": "template"}
    if raw["type"] == "openai_compatible":
        endpoint = ctx.settings.synth_endpoints[raw["endpoint"]]
        config = {"name": raw["endpoint"], **endpoint.model_dump()}
        return {**raw, "endpoint_config": config, "describe": f"openai_compatible:{raw['endpoint']}:{endpoint.model}"}
    ref = raw["model"]
    model_dir = _model_dir(session, ctx, agent, ref, param)
    return {**raw, "model_dir": str(model_dir), "parameters": modelinfo.count_parameters(model_dir),
            "describe": f"model:{ref if ref.startswith('mdl_') else model_dir.name}"}


def _model_dir(session: Session, ctx: ServiceContext, agent: Agent, ref: str, param: str) -> Path:
    if ref.startswith("mdl_"):
        model = owned(session, Model, ref, agent.id, param)
        if model.adapter == "lora" and not model.merged_path:
            raise InvalidRequest(f"{ref} is a LoRA adapter without a merged copy; train it with "
                                 "merge_adapter=true to generate with it", param=param)
        return Path(model.merged_path or model.path)
    directory = resolve_in_roots(ctx.settings, ref, param)
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"{ref!r} is not a Hugging Face model directory (no config.json)", param=param)
    return directory


def _source(dataset: Dataset) -> dict[str, Any]:
    return {"dataset_id": dataset.id, "content_hash": dataset.content_hash, "path": dataset.path}
