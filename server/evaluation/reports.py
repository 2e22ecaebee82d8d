"""Reports: the gate per KPI (candidate against baseline on the same items), the verdict, what to do
next, KPI drift against the family's history, and finding a report by report, job or model."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.errors import NotFound
from server.store.db import owned
from server.store.tables import EvalReport, Job, JobEvent
from training_core import drift, gate, suite

HISTORY_REPORTS = 50


def latest_report(session: Session, agent_id: str, suite_id: str, model_ref: str) -> EvalReport | None:
    return session.exec(select(EvalReport).where(
        EvalReport.agent_id == agent_id, EvalReport.suite_id == suite_id, EvalReport.model_ref == model_ref,
    ).order_by(col(EvalReport.created_at).desc())).first()


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
    if (data_drift.get("overlap") or {}).get("flagged"):
        steps.append("some of the suite's items are in the model's training data, so its scores flatter the model: "
                     "hold those items out of training (generate_synthetic_data decontaminates against suites)")
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


def find_report(session: Session, agent_id: str, ref: str) -> EvalReport:
    """By report id; by job id (an eval job's candidate, or the model a train job produced); or the
    newest report of a model (id or directory)."""
    if ref.startswith("rep_"):
        return owned(session, EvalReport, ref, agent_id, "ref")
    query = select(EvalReport).where(EvalReport.agent_id == agent_id)
    if ref.startswith("job_"):
        job = owned(session, Job, ref, agent_id, "ref")
        query = query.where(EvalReport.job_id == job.id, EvalReport.model_ref == job.resolved["candidate"]["ref"]) \
            if job.kind == "eval" else query.where(EvalReport.model_ref == (job.model_id or ""))
    else:
        query = query.where(EvalReport.model_ref == ref)
    report = session.exec(query.order_by(col(EvalReport.created_at).desc())).first()
    if report is None:
        raise NotFound(f"no eval report for {ref} yet; run_eval starts one (then wait_for_job on the eval job)",
                       param="ref")
    return report


def baseline_report(session: Session, agent_id: str, report: EvalReport, baseline: str | None) -> EvalReport | None:
    if baseline is None:
        return session.get(EvalReport, report.baseline_report_id) if report.baseline_report_id else None
    found = latest_report(session, agent_id, report.suite_id, baseline)
    if found is None:
        raise NotFound(f"{baseline} has no report on suite {report.suite_id}; run_eval with model="
                       f"{report.model_ref} and baseline={baseline}", param="baseline")
    return found


def worst_items(rows: list[dict[str, Any]], items: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    failing = [r for r in rows if (r.get("gate") or {}).get("verdict") == "fail" or r["threshold_met"] is False]
    key = (failing or rows)[0]
    sign = 1.0 if key["direction"] == "higher" else -1.0
    return sorted(items, key=lambda item: sign * item["scores"][key["name"]])[:count]


def training_curve(session: Session, report: EvalReport) -> list[tuple[int, float]]:
    """Loss over steps of the train job that produced the model (empty for a base directory)."""
    if report.model_id is None:
        return []
    job = session.exec(select(Job).where(Job.model_id == report.model_id)).first()
    if job is None:
        return []
    events = session.exec(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
                          .order_by(col(JobEvent.seq))).all()
    return [(int(e.data["step"]), float(e.data["loss"])) for e in events
            if e.data.get("loss") is not None and e.data.get("step") is not None]


def family_history(session: Session, report: EvalReport) -> list[dict[str, Any]]:
    """KPI values of the family's reports on this suite, oldest first, up to this one."""
    rows = session.exec(select(EvalReport).where(
        EvalReport.agent_id == report.agent_id, EvalReport.suite_id == report.suite_id,
        EvalReport.model_family == report.model_family, EvalReport.created_at <= report.created_at,
    ).order_by(col(EvalReport.created_at).desc()).limit(HISTORY_REPORTS)).all()
    return [{"id": r.id, "kpis": {k["name"]: k["value"] for k in r.summary["kpis"]}} for r in reversed(rows)]
