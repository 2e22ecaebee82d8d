"""list_datasets: the agent's datasets, newest first, with the lineage of generated ones."""

from __future__ import annotations

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.store.tables import Agent, Dataset
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import DatasetView, dataset_view


class ListDatasetsRequest(ToolRequest):
    name: str | None = Field(None, description="Only datasets of this name.")
    limit: int = Field(20, ge=1, le=100, description="Datasets listed.")


class DatasetList(ToolResult):
    datasets: list[DatasetView]

    def summary(self) -> str:
        return "\n".join(d.summary() for d in self.datasets) or "no datasets"


def list_datasets(ctx: ServiceContext, agent: Agent, request: ListDatasetsRequest) -> DatasetList:
    query = select(Dataset).where(Dataset.agent_id == agent.id)
    if request.name is not None:
        query = query.where(Dataset.name == request.name)
    with Session(ctx.engine) as session:
        rows = session.exec(query.order_by(col(Dataset.created_at).desc()).limit(request.limit))
        return DatasetList(datasets=[dataset_view(d) for d in rows])


TOOL = Tool(
    name="list_datasets", request=ListDatasetsRequest, result=DatasetList, function=list_datasets,
    access="read",
    description="Your datasets, newest first: id, name, format, records, content hash, source; a generated "
                "one's lineage (job, generator, sources and what it was decontaminated against, by id and hash).",
    route=Route("GET", "/datasets"), command=Command(("datasets", "list")))
