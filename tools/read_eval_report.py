"""read_eval_report: a report's verdict, KPIs against thresholds and baseline, worst items, drift and
what to try next, compact for an agent; the HTML version with plots is for people."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlmodel import Session

from server.context import ServiceContext
from server.evaluation import report_html, reports
from server.store.db import owned
from server.store.tables import Agent, EvalReport, EvalSuite
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from training_core import suite

TEXT_CHARS = 300
"""Outputs and references in a result are cut here; the HTML report shows more."""
PAGE_ITEMS = 20


class ReadEvalReportRequest(ToolRequest):
    ref: str = Field(description="A report id (rep_...), an eval or train job id, or a model (id, alias:NAME "
                     "or directory): its newest report.")
    baseline: str | None = Field(None, description="Compare with this model's report on the same suite instead "
                                 "of the report's own baseline.")
    page: int = Field(0, ge=0, le=10_000, description="0: the 3 worst items; n: items 20 at a time, in order.")


class ReportView(ToolResult):
    id: str
    verdict: str = Field(description="pass, fail or inconclusive (thresholds and the regression gate).")
    model: str
    baseline: str | None = None
    composite: float | None = None
    kpis: list[dict[str, Any]] = Field(description="name, value, threshold, threshold_met, gate {baseline, delta, "
                                       "ci95, p_value, test, verdict, items_needed}.")
    items: list[dict[str, Any]]
    drift: dict[str, Any]
    next_steps: list[str]
    html_url: str

    def summary(self) -> str:
        lines = [f"{self.id} {self.verdict}: {self.model}" + (f" vs {self.baseline}" if self.baseline else "")]
        for kpi in self.kpis:
            gate = kpi.get("gate") or {}
            vs = (f"  baseline {gate['baseline']:.4g}  delta {gate['delta']:+.4g} [{gate['ci95'][0]:+.4g}, "
                  f"{gate['ci95'][1]:+.4g}]  p={gate['p_value']:.3g}  {gate['verdict']}") if gate else ""
            lines.append(f"  {kpi['name']:<16} {kpi['value']:.4g}{vs}")
        return "\n".join(lines + [f"  next: {step}" for step in self.next_steps])


def read_eval_report(ctx: ServiceContext, agent: Agent, request: ReadEvalReportRequest, worst: int = 3) -> ReportView:
    with Session(ctx.engine) as session:
        report = reports.find_report(session, agent.id, request.ref)
        suite_row = session.get(EvalSuite, report.suite_id)
        baseline_report = reports.baseline_report(session, agent.id, report, request.baseline)
    assert suite_row is not None
    definition = suite.SuiteDefinition.model_validate(suite_row.definition)
    rows, verdict, steps = report.summary["kpis"], report.verdict, report.summary["next_steps"]
    items = reports.read_results(report.results_path)
    base_items = reports.read_results(baseline_report.results_path) if baseline_report else []
    if baseline_report is not None and baseline_report.id != report.baseline_report_id:
        gates = reports.gate_rows(definition, items, base_items)
        rows = [{**row, "gate": gates.get(row["name"])} for row in rows]
        verdict = reports.overall_verdict(rows, True)
        steps = reports.next_steps(rows, report.summary["drift"], verdict)
    base_by_index = {item["index"]: item for item in base_items}
    page = request.page
    chosen = items[(page - 1) * PAGE_ITEMS: page * PAGE_ITEMS] if page > 0 else []
    notes = [row["gate"]["note"] for row in rows if row.get("gate") and row["gate"].get("note")]
    return ReportView(
        id=report.id, verdict=verdict, model=report.model_ref,
        baseline=baseline_report.model_ref if baseline_report else None,
        composite=report.summary.get("composite"), kpis=[_kpi_row(row) for row in rows],
        items=[_item(item, base_by_index.get(item["index"]))
               for item in chosen or reports.worst_items(rows, items, min(worst, 10))],
        drift=_compact_drift(report.summary["drift"]), next_steps=notes + steps,
        html_url=f"/v1/reports/{report.id}.html")


def read_eval_report_html(ctx: ServiceContext, agent: Agent, report_id: str) -> str:
    """The HTML report: KPI bars against the baseline with intervals, the training curve, drift."""
    view = read_eval_report(ctx, agent, ReadEvalReportRequest(ref=report_id), worst=10)
    with Session(ctx.engine) as session:
        report = owned(session, EvalReport, report_id, agent.id, "report_id")
        curve = reports.training_curve(session, report)
        history = reports.family_history(session, report)
    return report_html.render(view.model_dump(mode="json"), curve, history)


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
    return {"data": None if data_drift is None else {k: data_drift.get(k) for k in (
        "js_distance", "domain_auc", "auc_reading", "drifted", "overlap")}, "kpi": kpis or None}


TOOL = Tool(
    name="read_eval_report", request=ReadEvalReportRequest, result=ReportView, function=read_eval_report,
    access="read",
    description="An eval report: verdict; per KPI its value, threshold and the gate against the baseline "
                "(delta, 95% CI, p, verdict, items needed); the worst items; drift; next steps; html_url.",
    route=Route("GET", "/reports/{ref}"), command=Command(("eval", "report"), args=("ref",)))
