"""What finished work made, as pipeline steps and `after` conditions name it
(`pipelines.OUTPUTS`): a train job's model and metrics, an eval job's report, verdict and KPIs with
their gate, a synth job's dataset, a study's model and best value."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from server.evaluation.reports import find_report
from server.store.tables import Job, JobState


def of_job(engine: Engine, job: Job) -> dict[str, Any]:
    """The outputs of a job that ended (an unsucceeded one made none but its state and error)."""
    found: dict[str, Any] = {"job_id": job.id, "state": job.state, "kind": job.kind,
                             "error": job.error or {"code": None, "message": None, "param": None}}
    if job.state != JobState.succeeded:
        return found
    metrics = job.metrics or {}
    if job.kind == "train":
        found.update(model_id=job.model_id,
                     metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
    elif job.kind == "synth":
        found.update(dataset_id=metrics.get("dataset_id"))
    elif job.kind == "tune":
        found.update(model_id=job.model_id, best_value=metrics.get("best_value"),
                     best_params=metrics.get("best_params") or {})
    elif job.kind == "eval":
        with Session(engine) as session:
            report = find_report(session, job.agent_id, job.id)
        found.update(report_id=report.id, verdict=report.verdict, model_id=report.model_id,
                     kpis={row["name"]: _kpi(row) for row in report.summary["kpis"]})
    elif job.kind == "pipeline":
        found.update({k: metrics[k] for k in ("model_id", "promoted", "outcome") if k in metrics})
    return found


def _kpi(row: dict[str, Any]) -> dict[str, Any]:
    gate = row.get("gate") or {}
    return {"value": row["value"], "delta": gate.get("delta"), "ci95_low": gate.get("ci_low"),
            "ci95_high": gate.get("ci_high"), "p_value": gate.get("p_value"), "verdict": gate.get("verdict")}
