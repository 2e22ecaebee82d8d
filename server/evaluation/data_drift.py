"""Data drift for reports and `check_drift`: the texts of a model's training data or a dataset,
read in bounded amounts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.errors import InvalidRequest
from server.evaluation.reports import kpi_drift, latest_report
from server.evaluation.suites import owned_suite
from server.store import aliases
from server.store.db import owned
from server.store.tables import Dataset, EvalSuite
from training_core import data, drift

DRIFT_READ_RECORDS = 20_000


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


def check(engine: Engine, agent_id: str, against: str, dataset_id: str | None, suite_id: str | None
          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(data drift of `dataset_id` from `against`'s training data or from a dataset `against`, KPI
    drift of `against`'s newest report on `suite_id`); either is None when not asked for."""
    if dataset_id is None and suite_id is None:
        raise InvalidRequest("give dataset_id (data drift) and/or suite_id (KPI drift)", param="dataset_id")
    with Session(engine) as session:
        model = reference = None
        if against.startswith("ds_"):
            reference = owned(session, Dataset, against, agent_id, "against")
        else:
            model = aliases.resolve_model(session, agent_id, against, "against")
            if model is None:
                raise InvalidRequest(f"{against!r} is neither a dataset (ds_...) nor a model (mdl_... or alias:NAME)",
                                     param="against")
        current = owned(session, Dataset, dataset_id, agent_id, "dataset_id") if dataset_id else None
        suite_row = owned_suite(session, agent_id, suite_id) if suite_id else None
    data_result = None
    if current is not None:
        texts = dataset_texts([reference]) if reference else training_texts(
            engine, agent_id, model.dataset_hashes if model else [])
        if not texts:
            raise InvalidRequest(f"{against} has no training data on record; compare with a dataset id",
                                 param="against")
        try:
            data_result = drift.data_drift(texts, dataset_texts([current]))
        except ValueError as err:
            raise InvalidRequest(str(err), param="dataset_id") from err
    kpi_result = None
    if suite_row is not None:
        if model is None:
            raise InvalidRequest("KPI drift needs against= the model whose reports to check", param="against")
        with Session(engine) as session:
            report = latest_report(session, agent_id, suite_row.id, model.id)
        if report is None:
            raise InvalidRequest(f"{model.id} has no report on {suite_row.id}; run_eval first", param="suite_id")
        kpi_result = kpi_drift(engine, report, {k["name"]: k["value"] for k in report.summary["kpis"]})
    return data_result, kpi_result
