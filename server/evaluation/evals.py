"""Evaluation in the service: store suites, price and queue eval jobs, and turn their results into
reports with the regression gate, KPI drift and data drift.

An eval job evaluates the candidate and, when the baseline has no report on the suite yet, the
baseline too, in one child process (`training_core.evaluate`): one admission, one reservation,
and both models scored with the same code and decoding settings. When it succeeds,
`finish_eval_job` stores one report per model it ran; the candidate's carries the gate computed
from both reports' per-item scores, paired by item.

An eval job keeps no checkpoints: one whose process dies runs again from its first item (eval jobs
are short next to training, and a half-scored set would pair badly with its baseline).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.admission import guardrails
from server.admission.datasets import resolve_in_roots, sha256_file
from server.errors import InvalidDataset, InvalidRequest
from server.settings import Settings
from server.store import jobs
from server.store.db import owned, write_transaction
from server.store.tables import Agent, Dataset, EvalReport, EvalSuite, Job, JobState, Model, Reservation
from training_core import data, drift, gate, modelinfo, suite
from training_core.spec import Hyperparameters, JobResult, JobSpec, Limits

EVAL_FORMATS = ("prompt_completion", "messages")
HISTORY_REPORTS = 50
DRIFT_READ_RECORDS = 20_000


@dataclass(frozen=True)
class EvalTarget:
    """A model as an eval job loads it, and what the report needs to know of its lineage."""

    ref: str
    """The registered model id, or the local directory."""
    path: str
    base_path: str | None
    """The base a LoRA adapter (at `path`) is loaded onto; None for full weights."""
    parameters: int
    family: str
    model_id: str | None = None
    parent_ref: str | None = None
    dataset_hashes: list[str] = field(default_factory=list)


# ---- suites --------------------------------------------------------------------------------------

def create_suite(engine: Engine, agent_id: str, raw: dict[str, Any]) -> EvalSuite:
    """Validate and store a suite; the same definition on the same data returns the stored one."""
    found = suite.problems(raw)
    if found:
        listed = "; ".join(f"{where}: {message}" for where, message in found)
        raise InvalidRequest(f"the suite has {len(found)} problem(s): {listed}", param=found[0][0],
                             details={"problems": [{"field": w, "message": m} for w, m in found]})
    definition = suite.SuiteDefinition.model_validate(raw)
    with Session(engine) as session:
        dataset = owned(session, Dataset, definition.dataset, agent_id, "dataset")
    if not dataset.valid or dataset.format not in EVAL_FORMATS:
        why = "failed validation" if not dataset.valid else f"holds {dataset.format} records"
        raise InvalidRequest(f"dataset {dataset.id} {why}; eval items need valid prompt_completion or "
                             "messages records (the completion or last assistant turn is the reference)",
                             param="dataset")
    canonical = definition.model_dump(mode="json")
    content_hash = hashlib.sha256(json.dumps([canonical, dataset.content_hash], sort_keys=True)
                                  .encode("utf-8")).hexdigest()
    with write_transaction(engine) as session:
        existing = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id,
                                                        EvalSuite.content_hash == content_hash)).first()
        if existing is not None:
            return existing
        row = EvalSuite(agent_id=agent_id, name=definition.name, definition=canonical, dataset_id=dataset.id,
                        content_hash=content_hash, items=min(dataset.records, definition.max_items or dataset.records))
        session.add(row)
        return row


def owned_suite(session: Session, agent_id: str, suite_id: str, param: str = "suite_id") -> EvalSuite:
    return owned(session, EvalSuite, suite_id, agent_id, param)


# ---- models --------------------------------------------------------------------------------------

def resolve_target(session: Session, settings: Settings, agent_id: str, ref: str, param: str) -> EvalTarget:
    """A registered model of the agent's, or a model directory inside a data root."""
    if ref.startswith("mdl_"):
        return target_for_model(session, owned(session, Model, ref, agent_id, param))
    directory = resolve_in_roots(settings, ref, param)
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"{ref!r} is not a Hugging Face model directory (no config.json)", param=param)
    return EvalTarget(ref=str(directory), path=str(directory), base_path=None,
                      parameters=modelinfo.count_parameters(directory), family=str(directory))


def target_for_model(session: Session, model: Model) -> EvalTarget:
    base_dir = model.config.get("spec", {}).get("base_model")
    lora_only = model.adapter == "lora" and not model.merged_path
    parent_ref = model.parent_model_id or base_dir
    return EvalTarget(ref=model.id, model_id=model.id, path=model.merged_path or model.path,
                      base_path=base_dir if lora_only else None, parameters=model.parameters,
                      family=_family(session, model), parent_ref=parent_ref, dataset_hashes=model.dataset_hashes)


def _family(session: Session, model: Model) -> str:
    """The first base model of the lineage: every fine-tune of one base is one family."""
    seen = {model.id}
    while model.parent_model_id and model.parent_model_id not in seen:
        parent = session.get(Model, model.parent_model_id)
        if parent is None:
            break
        seen.add(parent.id)
        model = parent
    return model.config.get("spec", {}).get("base_model") or model.base_model


def latest_report(session: Session, agent_id: str, suite_id: str, model_ref: str) -> EvalReport | None:
    return session.exec(select(EvalReport).where(
        EvalReport.agent_id == agent_id, EvalReport.suite_id == suite_id, EvalReport.model_ref == model_ref,
    ).order_by(col(EvalReport.created_at).desc())).first()


# ---- eval jobs -----------------------------------------------------------------------------------

def estimate(engine: Engine, suite_row: EvalSuite, model_parameters: list[int],
             max_seconds: float | None) -> guardrails.Estimate:
    """2 x parameters x tokens: prompt and generated tokens of every item, plus prompt and
    reference again when a KPI needs perplexity; one step is one batch of one model.
    `model_parameters`: one entry per model run (a study prices its trials' evals before any exists)."""
    definition = suite.SuiteDefinition.model_validate(suite_row.definition)
    with Session(engine) as session:
        dataset = session.get(Dataset, suite_row.dataset_id)
    assert dataset is not None
    record_tokens = float(dataset.report.get("stats", {}).get("tokens", {}).get("mean") or 1.0)
    perplexity = any(kpi.grader["type"] == "perplexity" for kpi in definition.kpis)
    per_item = math.ceil(record_tokens * (2 if perplexity else 1) + definition.decoding.max_new_tokens)
    batches = math.ceil(suite_row.items / definition.decoding.batch_size)
    return guardrails.Estimate(
        parameters=max(model_parameters), tokens_per_step=per_item * definition.decoding.batch_size,
        max_steps=batches * len(model_parameters), dataset_bytes=dataset.bytes, max_seconds=max_seconds,
        flops_per_parameter_token=2.0)


def queue_eval(engine: Engine, runs_dir: Path, agent: Agent, suite_row: EvalSuite, candidate: EvalTarget,
               baseline: EvalTarget | None, *, max_seconds: float | None = None,
               request: dict[str, Any] | None = None) -> Job:
    """Admit and queue an eval job, or raise LimitExceeded; the baseline runs too if it has no report."""
    job, price = prepare_eval_job(engine, runs_dir, agent, suite_row, candidate, baseline, max_seconds=max_seconds,
                                  request=request)
    with write_transaction(engine) as session:
        verdict = guardrails.admit(session, engine, agent.id, price)
        guardrails.raise_if_refused(verdict, price)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=price.flops))
    return job


def prepare_eval_job(engine: Engine, runs_dir: Path, agent: Agent, suite_row: EvalSuite, candidate: EvalTarget,
                     baseline: EvalTarget | None, *, max_seconds: float | None = None,
                     request: dict[str, Any] | None = None) -> tuple[Job, guardrails.Estimate]:
    """An unsaved, queued eval job with its spec, and its price; the caller admits and inserts it
    (`queue_eval`, or a study carving it out of its own reservation)."""
    with Session(engine) as session:
        baseline_report = latest_report(session, agent.id, suite_row.id, baseline.ref) if baseline else None
        dataset = session.get(Dataset, suite_row.dataset_id)
    assert dataset is not None
    if sha256_file(Path(dataset.path)) != dataset.content_hash:  # a snapshot never changes; if it did, refuse
        raise InvalidDataset(f"the snapshot of {dataset.id} no longer matches its hash; upload it again and "
                             "declare the suite on the new dataset", param="suite_id")
    runs = [("candidate", candidate)] + ([("baseline", baseline)] if baseline and not baseline_report else [])
    price = estimate(engine, suite_row, [t.parameters for _, t in runs], max_seconds)
    job = Job(agent_id=agent.id, kind="eval", method="eval", state=JobState.queued, request=request or {},
              estimate_flops=price.flops)
    job.run_dir = str((runs_dir / job.id).resolve())
    job.output_dir = str(Path(job.run_dir) / "output")
    definition = suite.SuiteDefinition.model_validate(suite_row.definition)
    spec = JobSpec(
        job_id=job.id, method="eval", run_dir=job.run_dir, output_dir=job.output_dir, base_model=candidate.path,
        train_files=[dataset.path], hyperparameters=Hyperparameters(
            learning_rate=0.0, max_steps=price.max_steps, per_device_batch_size=definition.decoding.batch_size,
            gradient_accumulation_steps=1,
            max_seq_length=definition.decoding.max_prompt_tokens + definition.decoding.max_new_tokens),
        limits=Limits(max_seconds=min(max_seconds or agent.max_request_seconds, agent.max_request_seconds),
                      max_flops=agent.max_request_flops, max_tokens=agent.max_request_tokens),
        flops_per_token=2.0 * candidate.parameters,
        options={"suite": suite_row.definition, "models": [
            {"role": role, "ref": t.ref, "path": t.path, "base_path": t.base_path} for role, t in runs]})
    job.resolved = {
        "spec": json.loads(spec.to_json()), "estimate": {
            "parameters": price.parameters, "tokens": price.tokens, "flops": price.flops,
            "max_steps": price.max_steps, "tokens_per_step": price.tokens_per_step},
        "suite_id": suite_row.id, "candidate": asdict(candidate),
        "baseline": asdict(baseline) if baseline else None,
        "baseline_report_id": baseline_report.id if baseline_report else None}
    return job, price


def queue_after_training(engine: Engine, train_job: Job, model: Model) -> Job | None:
    """The eval a train job asked for (`eval_suite`), baseline its parent; a refusal is recorded on
    the train job as a warning, never turned into a failure of the training that succeeded."""
    runs_dir = Path(train_job.run_dir).parent  # every job's run directory lies in HOME/runs
    try:
        with Session(engine) as session:
            agent = session.get(Agent, train_job.agent_id)
            suite_row = owned_suite(session, train_job.agent_id, train_job.resolved["eval_suite"], "eval_suite")
            candidate = target_for_model(session, model)
            parent = session.get(Model, model.parent_model_id) if model.parent_model_id else None
            baseline = target_for_model(session, parent) if parent else EvalTarget(
                ref=model.config["spec"]["base_model"], path=model.config["spec"]["base_model"], base_path=None,
                parameters=model.parameters, family=candidate.family)
        assert agent is not None
        job = queue_eval(engine, runs_dir, agent, suite_row, candidate, baseline,
                         request={"model": model.id, "suite_id": suite_row.id, "after_job": train_job.id})
    except Exception as error:  # noqa: BLE001 -- any refusal is reported on the train job, not raised
        _note(engine, train_job.id, "warning", f"the eval on {train_job.resolved['eval_suite']} was not "
              f"started: {error}", {})
        return None
    _note(engine, train_job.id, "info", f"eval job {job.id} queued", {"eval_job_id": job.id})
    return job


def _note(engine: Engine, job_id: str, level: str, message: str, data_: dict[str, Any]) -> None:
    with write_transaction(engine) as session:
        row = session.get(Job, job_id)
        assert row is not None
        jobs._append_event(session, row, level, "message", message, data_)
        session.add(row)


# ---- reports -------------------------------------------------------------------------------------

def finish_eval_job(engine: Engine, job: Job, epoch: int, result: JobResult) -> None:
    """ON_SUCCESS["eval"]: store a report per model run, then end the job under its epoch."""
    resolved, runs = job.resolved, result.metrics["runs"]
    with Session(engine) as session:
        suite_row = session.get(EvalSuite, resolved["suite_id"])
        stored_baseline = session.get(EvalReport, resolved["baseline_report_id"]) \
            if resolved.get("baseline_report_id") else None
    assert suite_row is not None
    definition = suite.SuiteDefinition.model_validate(suite_row.definition)
    reports: list[EvalReport] = []
    baseline_report = stored_baseline
    if "baseline" in runs:
        baseline_report = _report(engine, job, suite_row, definition, resolved["baseline"], runs["baseline"], None,
                                  result.metrics)
        reports.append(baseline_report)
    candidate_report = _report(engine, job, suite_row, definition, resolved["candidate"], runs["candidate"],
                               baseline_report, result.metrics)
    reports.append(candidate_report)
    with write_transaction(engine) as session:
        row = session.get(Job, job.id)
        if row is None or row.lease_epoch != epoch:
            return  # another worker holds the job now: it writes the reports
        for report in reports:
            session.add(report)
    metrics = {"report_id": candidate_report.id, "verdict": candidate_report.verdict,
               **{f"kpi_{k}": v for k, v in runs["candidate"]["kpis"].items()}, "runs": runs}
    jobs.finish(engine, job.id, epoch, JobState.succeeded, metrics=metrics)


def _report(engine: Engine, job: Job, suite_row: EvalSuite, definition: suite.SuiteDefinition,
            target: dict[str, Any], run: dict[str, Any], baseline: EvalReport | None,
            job_metrics: dict[str, Any]) -> EvalReport:
    items = read_results(run["results_path"])
    gates = gate_rows(definition, items, read_results(baseline.results_path)) if baseline else {}
    rows = []
    for kpi in definition.kpis:
        value = run["kpis"][kpi.name]
        met = None if kpi.threshold is None else (
            value >= kpi.threshold if kpi.direction == "higher" else value <= kpi.threshold)
        rows.append({"name": kpi.name, "value": value, "direction": kpi.direction, "threshold": kpi.threshold,
                     "threshold_met": met, "allowed_regression": kpi.allowed_regression, "weight": kpi.weight,
                     "pass_fail": kpi.pass_fail, "gate": gates.get(kpi.name)})
    report = EvalReport(agent_id=job.agent_id, job_id=job.id, suite_id=suite_row.id, model_ref=target["ref"],
                        model_id=target["model_id"], model_family=target["family"],
                        baseline_ref=baseline.model_ref if baseline else None,
                        baseline_report_id=baseline.id if baseline else None, results_path=run["results_path"])
    summary: dict[str, Any] = {
        "kpis": rows, "composite": run.get("composite"), "items": run["items"],
        "clusters": len({i["cluster"] if i["cluster"] is not None else f"#{i['index']}" for i in items}),
        "decoding": job_metrics.get("decoding"),
        "baseline_composite": baseline.summary.get("composite") if baseline else None,
        "drift": {"kpi": kpi_drift(engine, report, run["kpis"]),
                  "data": data_drift_for(engine, job.agent_id, target["dataset_hashes"], suite_row)}}
    report.verdict = overall_verdict(rows, baseline is not None)
    summary["next_steps"] = next_steps(rows, summary["drift"], report.verdict)
    report.summary = summary
    return report


def read_results(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def gate_rows(definition: suite.SuiteDefinition, candidate: list[dict[str, Any]],
              baseline: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gate per KPI over the items both reports scored, paired by item."""
    base_by_index = {item["index"]: item for item in baseline}
    paired = [(item, base_by_index[item["index"]]) for item in candidate if item["index"] in base_by_index]
    if not paired:
        return {}
    clusters = [c["cluster"] for c, _ in paired]
    rows = {}
    for kpi in definition.kpis:
        result = gate.compare([c["scores"][kpi.name] for c, _ in paired], [b["scores"][kpi.name] for _, b in paired],
                              pass_fail=kpi.pass_fail, direction=kpi.direction, aggregation=kpi.aggregation,
                              allowed_regression=kpi.allowed_regression, clusters=clusters)
        rows[kpi.name] = result.to_dict()
    return rows


def overall_verdict(rows: list[dict[str, Any]], has_baseline: bool) -> str:
    """fail: a threshold missed or a gate failed; pass: every threshold met and, with a baseline,
    every gate passed; inconclusive otherwise (or when nothing was declared to judge by)."""
    thresholds = [r["threshold_met"] for r in rows if r["threshold_met"] is not None]
    gates = [r["gate"]["verdict"] for r in rows if r["gate"]]
    if False in thresholds or "fail" in gates:
        return "fail"
    if not thresholds and not gates:
        return "inconclusive"
    if has_baseline and any(v != "pass" for v in gates):
        return "inconclusive"
    return "pass"


def next_steps(rows: list[dict[str, Any]], found_drift: dict[str, Any], verdict: str) -> list[str]:
    """What to try next, most useful first; short, for an agent to act on."""
    steps = []
    for row in rows:
        gate_row = row["gate"] or {}
        if gate_row.get("verdict") == "fail":
            steps.append(f"{row['name']} regressed ({gate_row['delta']:+.3g} vs baseline): read the worst items, "
                         "then retrain with data like them, fewer steps or a lower learning rate")
        elif row["threshold_met"] is False:
            steps.append(f"{row['name']} = {row['value']:.3g} misses its threshold {row['threshold']:g}: add "
                         "training data like the failing items or train longer")
        if gate_row.get("items_needed"):
            steps.append(f"{row['name']}: the suite is too small to detect a regression of "
                         f"{row['allowed_regression']:g}; about {gate_row['items_needed']} items would")
    data_drift = found_drift.get("data") or {}
    if data_drift.get("drifted"):
        steps.append("the suite's items are unlike the model's training data (drift): train on data like them")
    if any((d or {}).get("drifted") for d in (found_drift.get("kpi") or {}).values()):
        steps.append("a KPI left its usual range over this family's reports: compare with the last good model")
    if verdict == "inconclusive" and not steps:
        steps.append("declare thresholds or allowed_regression, or add items, to get a verdict")
    return steps[:5]


def kpi_drift(engine: Engine, report: EvalReport, values: dict[str, float]) -> dict[str, Any]:
    """Each KPI against its mean +- 3 sd over the family's earlier reports on this suite."""
    with Session(engine) as session:
        earlier = session.exec(select(EvalReport).where(
            EvalReport.suite_id == report.suite_id, EvalReport.model_family == report.model_family,
            EvalReport.agent_id == report.agent_id, EvalReport.created_at < report.created_at,
        ).order_by(col(EvalReport.created_at).desc()).limit(HISTORY_REPORTS)).all()
    found = {}
    for name, value in values.items():
        history = [r.summary["kpis"][i]["value"] for r in reversed(earlier)
                   for i, row in enumerate(r.summary["kpis"]) if row["name"] == name]
        found[name] = drift.kpi_drift(history, value)
    return found


def data_drift_for(engine: Engine, agent_id: str, dataset_hashes: list[str],
                   suite_row: EvalSuite) -> dict[str, Any] | None:
    """Drift between the suite's data and the data the model was trained on; None when the model
    has no training data on record (a base directory) or either side is too small."""
    training = training_texts(engine, agent_id, dataset_hashes)
    with Session(engine) as session:
        suite_data = session.get(Dataset, suite_row.dataset_id)
    current = dataset_texts([suite_data] if suite_data else [])
    if len(training) < drift.FOLDS or len(current) < drift.FOLDS:
        return None
    return drift.data_drift(training, current)


def training_texts(engine: Engine, agent_id: str, dataset_hashes: list[str]) -> list[str]:
    if not dataset_hashes:
        return []
    with Session(engine) as session:
        datasets = session.exec(select(Dataset).where(Dataset.agent_id == agent_id,
                                                      col(Dataset.content_hash).in_(dataset_hashes))).all()
    return dataset_texts(datasets)


def dataset_texts(datasets: list[Dataset]) -> list[str]:
    """The records' text, at most DRIFT_READ_RECORDS a dataset: drift samples 2,000 a side anyway,
    and a report must not wait on reading a multi-gigabyte training set (the cost: a file sorted by
    topic is judged by its first part)."""
    texts: list[str] = []
    for dataset in datasets:
        for count, (_, record) in enumerate(data.read_records(Path(dataset.path))):
            if count >= DRIFT_READ_RECORDS:
                break
            if isinstance(record, dict):
                texts.append(data.record_text(record))
    return texts
