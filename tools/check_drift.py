"""check_drift: is a new dataset unlike a model's training data, and have a model's KPIs left
their usual range? Runs in the call (a few seconds at most: each side is sampled to 2,000 records)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.evaluation import evals as evaluation
from server.store.db import owned
from server.store.tables import Agent, Dataset, EvalReport, Model
from tools.views import Compact
from training_core import drift


class DriftResult(Compact):
    drifted: bool
    data: dict[str, Any] = Field(default_factory=dict)
    kpi: dict[str, Any] = Field(default_factory=dict)


def check_drift(ctx: ServiceContext, agent: Agent, against: str, dataset_id: str | None = None,
                suite_id: str | None = None) -> DriftResult:
    """`against`: a model (its training data; its reports for KPI drift) or a reference dataset id."""
    if dataset_id is None and suite_id is None:
        raise InvalidRequest("give dataset_id (data drift) and/or suite_id (KPI drift)", param="dataset_id")
    with Session(ctx.engine) as session:
        model = reference = None
        if against.startswith("ds_"):
            reference = owned(session, Dataset, against, agent.id, "against")
        else:
            model = owned(session, Model, against, agent.id, "against")
        current = owned(session, Dataset, dataset_id, agent.id, "dataset_id") if dataset_id else None
        suite_row = evaluation.owned_suite(session, agent.id, suite_id) if suite_id else None
    data_result = None
    if current is not None:
        texts = evaluation.dataset_texts([reference]) if reference else evaluation.training_texts(
            ctx.engine, agent.id, model.dataset_hashes if model else [])
        if not texts:
            raise InvalidRequest(f"{against} has no training data on record; compare with a dataset id",
                                 param="against")
        try:
            data_result = drift.data_drift(texts, evaluation.dataset_texts([current]))
        except ValueError as err:
            raise InvalidRequest(str(err), param="dataset_id") from err
    kpi_result = None
    if suite_row is not None:
        if model is None:
            raise InvalidRequest("KPI drift needs against= the model whose reports to check", param="against")
        with Session(ctx.engine) as session:
            report = session.exec(select(EvalReport).where(
                EvalReport.agent_id == agent.id, EvalReport.suite_id == suite_row.id, EvalReport.model_ref == model.id,
            ).order_by(col(EvalReport.created_at).desc())).first()
        if report is None:
            raise InvalidRequest(f"{model.id} has no report on {suite_row.id}; run_eval first", param="suite_id")
        kpi_result = evaluation.kpi_drift(ctx.engine, report, {k["name"]: k["value"] for k in report.summary["kpis"]})
    drifted = bool(data_result and data_result["drifted"]) or any(
        (v or {}).get("drifted") for v in (kpi_result or {}).values())
    return DriftResult(data=data_result or {}, kpi=kpi_result or {}, drifted=drifted)
