"""Eval jobs: price and queue them, and turn their results into reports with the regression gate,
KPI drift and data drift.

An eval job evaluates the candidate and, when the baseline has no report on the suite yet, the
baseline too, in one child process (`training_core.evaluate`): one admission, one reservation,
and both models scored with the same code and decoding settings. When it succeeds,
`finish_eval_job` stores one report per model it ran; the candidate's carries the gate computed
from both reports' per-item scores, paired by item.

An eval job keeps no checkpoints: one whose process dies runs again from its first item (eval jobs
are short next to training, and a half-scored set would pair badly with its baseline).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from server.admission import guardrails, idempotency
from server.admission.datasets import sha256_file
from server.context import ServiceContext
from server.errors import InvalidDataset, InvalidRequest, LimitExceeded
from server.evaluation.data_drift import data_drift_for
from server.evaluation.reports import (
    gate_rows,
    kpi_drift,
    latest_report,
    next_steps,
    overall_verdict,
    read_results,
)
from server.evaluation.suites import owned_suite
from server.evaluation.targets import EvalTarget, resolve_target, target_for_model
from server.store import jobs
from server.store.db import write_transaction
from server.store.tables import Agent, Dataset, EvalReport, EvalSuite, Job, JobState, Model, Reservation
from training_core import suite
from training_core.spec import Hyperparameters, JobResult, JobSpec, Limits


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
               request: dict[str, Any] | None = None, origin: dict[str, Any] | None = None) -> Job:
    """Admit and queue an eval job, or raise LimitExceeded; the baseline runs too if it has no report.
    `origin` links it to what started it, with the key that keeps a firing or a step to one job."""
    job, price = prepare_eval_job(engine, runs_dir, agent, suite_row, candidate, baseline, max_seconds=max_seconds,
                                  request=request)
    job.request_hash = idempotency.request_hash_of(request or {})
    idempotency.link(job, origin)
    with write_transaction(engine) as session:
        if job.idempotency_key:
            existing = idempotency.existing_in(session, agent.id, job.idempotency_key, job.request_hash)
            if existing is not None:
                return existing
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


def after_training(engine: Engine, train_job: Job, model: Model) -> Callable[[Session, Job], None]:
    """The eval a train job asked for (`eval_suite`), baseline its parent, made ready to be queued in
    the transaction that ends the train job: an agent that sees the train job succeeded sees its eval
    too, and no crash between the two loses it. A refusal is recorded on the train job as a warning,
    never turned into a failure of the training that succeeded."""
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
        request = {"model": model.id, "suite_id": suite_row.id, "after_job": train_job.id}
        eval_job, price = prepare_eval_job(engine, runs_dir, agent, suite_row, candidate, baseline, request=request)
        eval_job.request_hash = idempotency.request_hash_of(request)
    except Exception as error:  # noqa: BLE001 -- any refusal is reported on the train job, not raised
        refusal = error
        return lambda session, row: _not_started(session, row, refusal)

    def queue(session: Session, row: Job) -> None:
        verdict = guardrails.admit(session, engine, agent.id, price)  # reads only: a refusal leaves nothing
        try:
            guardrails.raise_if_refused(verdict, price)
        except LimitExceeded as error:
            _not_started(session, row, error)
            return
        session.add(eval_job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=eval_job.id, flops_reserved=price.flops))
        jobs.append_event(session, row, "info", "message", f"eval job {eval_job.id} queued",
                          {"eval_job_id": eval_job.id})

    return queue


def _not_started(session: Session, train_job: Job, error: Exception) -> None:
    jobs.append_event(session, train_job, "warning", "message", f"the eval on {train_job.resolved['eval_suite']} "
                      f"was not started: {error}", {})


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


@dataclass(frozen=True)
class EvalPlan:
    """An eval asked for, resolved: the suite, the candidate, the baseline it is gated against (None:
    no gate), the models the job will run (a baseline with a report on the suite is not run again),
    and the price."""

    suite_row: EvalSuite
    candidate: EvalTarget
    baseline: EvalTarget | None
    runs: list[str]
    price: guardrails.Estimate


def plan_eval(ctx: ServiceContext, agent_id: str, model: str, suite_id: str, baseline: str | None,
              max_seconds: float | None = None) -> EvalPlan:
    """`baseline` None: the model's parent; "none": no gate."""
    with Session(ctx.engine) as session:
        suite_row = owned_suite(session, agent_id, suite_id)
        candidate = resolve_target(session, ctx.settings, agent_id, model, "model")
        baseline_ref = candidate.parent_ref if baseline is None else baseline
        baseline_target = None
        if baseline_ref and baseline_ref != "none":
            baseline_target = resolve_target(session, ctx.settings, agent_id, baseline_ref, "baseline")
            if baseline_target.ref == candidate.ref:
                raise InvalidRequest("baseline is the model itself; name another model or 'none'", param="baseline")
        has_report = baseline_target is not None and latest_report(
            session, agent_id, suite_row.id, baseline_target.ref) is not None
    targets = [candidate] + ([baseline_target] if baseline_target and not has_report else [])
    price = estimate(ctx.engine, suite_row, [t.parameters for t in targets], max_seconds)
    return EvalPlan(suite_row, candidate, baseline_target, [t.ref for t in targets], price)
