"""read_eval_report: a report's verdict, KPIs against thresholds and baseline, worst items, drift,
and what to try next, compact for an agent; the HTML version with plots is for people."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import NotFound
from server.evaluation import evals as evaluation
from server.evaluation import report_html
from server.store.db import owned
from server.store.tables import Agent, EvalReport, EvalSuite, Job, JobEvent
from tools.views import Compact
from training_core import suite

TEXT_CHARS = 300
"""Outputs and references in a result are cut here; the HTML report shows more."""
PAGE_ITEMS = 20


class ReportView(Compact):
    verdict: str
    model: str
    baseline: str = ""
    composite: float | None
    kpis: list[dict[str, Any]]
    items: list[dict[str, Any]]
    drift: dict[str, Any]
    next_steps: list[str]
    html_url: str


def read_eval_report(ctx: ServiceContext, agent: Agent, ref: str, baseline: str | None = None, page: int = 0,
                     worst: int = 3) -> ReportView:
    """`ref`: a report id, a job id, or a model (id or directory). `items` holds the `worst` items, or
    with `page` n > 0 the items (n-1)*PAGE_ITEMS onwards in order."""
    with Session(ctx.engine) as session:
        report = find_report(session, agent.id, ref)
        suite_row = session.get(EvalSuite, report.suite_id)
        baseline_report = _baseline_report(session, agent.id, report, baseline)
    assert suite_row is not None
    definition = suite.SuiteDefinition.model_validate(suite_row.definition)
    rows, verdict, steps = report.summary["kpis"], report.verdict, report.summary["next_steps"]
    items = evaluation.read_results(report.results_path)
    base_items = evaluation.read_results(baseline_report.results_path) if baseline_report else []
    if baseline_report is not None and baseline_report.id != report.baseline_report_id:
        gates = evaluation.gate_rows(definition, items, base_items)
        rows = [{**row, "gate": gates.get(row["name"])} for row in rows]
        verdict = evaluation.overall_verdict(rows, True)
        steps = evaluation.next_steps(rows, report.summary["drift"], verdict)
    base_by_index = {item["index"]: item for item in base_items}
    chosen = items[(page - 1) * PAGE_ITEMS: page * PAGE_ITEMS] if page > 0 else []
    notes = [row["gate"]["note"] for row in rows if row.get("gate") and row["gate"].get("note")]
    return ReportView(
        verdict=verdict, model=report.model_ref,
        baseline=baseline_report.model_ref if baseline_report else "",
        composite=report.summary.get("composite"), kpis=[_kpi_row(row) for row in rows],
        items=[_item(item, base_by_index.get(item["index"]))
               for item in chosen or worst_items(rows, items, min(worst, 10))], drift=_compact_drift(report.summary["drift"]),
        next_steps=notes + steps, html_url=f"/v1/reports/{report.id}.html")


def read_eval_report_html(ctx: ServiceContext, agent: Agent, report_id: str) -> str:
    """The HTML report: KPI bars against the baseline with intervals, the training curve, drift."""
    view = read_eval_report(ctx, agent, report_id, worst=10)
    with Session(ctx.engine) as session:
        report = owned(session, EvalReport, report_id, agent.id, "report_id")
        curve = training_curve(session, report)
        history = family_history(session, report)
    return report_html.render(view.model_dump(mode="json"), curve, history)


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


def _baseline_report(session: Session, agent_id: str, report: EvalReport, baseline: str | None) -> EvalReport | None:
    if baseline is None:
        return session.get(EvalReport, report.baseline_report_id) if report.baseline_report_id else None
    found = evaluation.latest_report(session, agent_id, report.suite_id, baseline)
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
    ).order_by(col(EvalReport.created_at).desc()).limit(evaluation.HISTORY_REPORTS)).all()
    return [{"id": r.id, "kpis": {k["name"]: k["value"] for k in r.summary["kpis"]}} for r in reversed(rows)]


def _kpi_row(row: dict[str, Any]) -> dict[str, Any]:
    gate = row.get("gate")
    compact = None if not gate else {
        "baseline": gate["baseline"], "delta": gate["delta"], "ci95": [gate["ci_low"], gate["ci_high"]],
        "p_value": gate["p_value"], "test": gate["test"], "verdict": gate["verdict"],
        "items_needed": gate["items_needed"]}
    return {"name": row["name"], "value": round(row["value"], 6), "threshold": row["threshold"],
            "threshold_met": row["threshold_met"], "gate": compact}


def _item(item: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    view = {"index": item["index"], "scores": item["scores"], "output": item["output"][:TEXT_CHARS],
            "reference": item["reference"][:TEXT_CHARS], "prompt": item["prompt"][-TEXT_CHARS:]}
    if baseline is not None:
        view["baseline_scores"] = baseline["scores"]
    return view


def _compact_drift(found: dict[str, Any]) -> dict[str, Any]:
    data_drift = found.get("data")
    kpis = {name: {k: v[k] for k in ("value", "low", "high", "drifted")} for name, v in (found.get("kpi") or {}).items()
            if v is not None}
    return {"data": None if data_drift is None else {k: data_drift[k] for k in (
        "js_distance", "domain_auc", "drifted")}, "kpi": kpis or None}
