"""Dataset tools: upload_dataset (inline content or a path in a data root), validate_dataset, list_datasets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from sqlmodel import Session, col, select

from server.admission import datasets
from server.context import ServiceContext
from server.store.tables import Agent, Dataset
from tools.views import Compact, DatasetView, dataset_view


class UploadDatasetRequest(Compact):
    model_config = ConfigDict(extra="forbid")
    filename: str | None = Field(None, description="With content: its name; the suffix picks the type "
                                 "(.jsonl, .csv, .parquet, .txt).")
    content: str | None = Field(None, description="The file's content (utf-8 text, or base64 with encoding=base64).")
    encoding: Literal["utf-8", "base64"] = "utf-8"
    path: str | None = Field(None, description="Instead of content: an absolute path inside a configured data root.")
    name: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_source(self) -> UploadDatasetRequest:
        if (self.content is None) == (self.path is None):
            raise ValueError("give exactly one of `content` (with `filename`) or `path`")
        if self.content is not None and not self.filename:
            raise ValueError("`filename` is required with `content` (its suffix picks the file type)")
        return self


class ProblemView(Compact):
    line: int | None
    field: str | None
    message: str


class ValidationView(Compact):
    dataset: DatasetView
    ok: bool
    problems: list[ProblemView] = Field(description="Every problem with its line (first `limit`).")
    problems_total: int
    stats: dict[str, Any]


def upload_dataset(ctx: ServiceContext, agent: Agent, request: UploadDatasetRequest) -> ValidationView:
    """Register an immutable, content-hashed snapshot and validate it; same bytes give the same dataset."""
    if request.path is not None:
        dataset = datasets.register_path(ctx.engine, ctx.settings, agent.id, request.path, request.name)
    else:
        assert request.content is not None and request.filename is not None
        dataset = datasets.upload(ctx.engine, ctx.settings, agent.id, request.filename, request.content,
                                  request.encoding, request.name)
    return _validation_view(dataset, limit=20)


def validate_dataset(ctx: ServiceContext, agent: Agent, dataset_id: str, limit: int = 50) -> ValidationView:
    return _validation_view(datasets.get(ctx.engine, agent.id, dataset_id), limit)


class DatasetList(Compact):
    datasets: list[DatasetView]


def list_datasets(ctx: ServiceContext, agent: Agent, limit: int = 50) -> DatasetList:
    with Session(ctx.engine) as session:
        rows = session.exec(select(Dataset).where(Dataset.agent_id == agent.id)
                            .order_by(col(Dataset.created_at).desc()).limit(max(1, min(limit, 200))))
        return DatasetList(datasets=[dataset_view(d) for d in rows])


def _validation_view(dataset: Dataset, limit: int) -> ValidationView:
    report = dataset.report
    problems = [ProblemView(**p) for p in report.get("problems", [])[: max(1, limit)]]
    return ValidationView(dataset=dataset_view(dataset), ok=dataset.valid, problems=problems,
                          problems_total=report.get("problems_total", len(problems)), stats=report.get("stats", {}))
