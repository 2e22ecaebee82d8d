"""validate_dataset: a stored dataset's validation report and lineage."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field

from server.admission import datasets
from server.context import ServiceContext
from server.store.tables import Agent, Dataset
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import DatasetView, dataset_view
from training_core.data import DatasetReport


class ValidateDatasetRequest(ToolRequest):
    dataset_id: str = Field(description="The dataset's id (ds_...).")
    limit: int = Field(20, ge=1, le=100, description="Problems shown.")


class ProblemView(ToolResult):
    line: int | None
    field: str | None
    message: str


class ValidationView(ToolResult):
    ok: bool
    dataset: DatasetView | None = Field(description="The stored dataset; null when the data failed validation "
                                        "(nothing was stored).")
    problems: list[ProblemView] = Field(description="Every problem with its line (the first `limit`).")
    problems_total: int
    stats: dict[str, Any] = Field(description="Records by format, token counts (about 4 characters a token).")

    def summary(self) -> str:
        head = self.dataset.summary() if self.dataset else "not stored: the data failed validation"
        lines = [f"{'ok' if self.ok else 'INVALID'}  {head}"]
        lines += [f"  line {p.line}: {p.field + ': ' if p.field else ''}{p.message}" for p in self.problems]
        if self.problems_total > len(self.problems):
            lines.append(f"  ... {self.problems_total - len(self.problems)} more")
        return "\n".join(lines)


def validation_view(dataset: Dataset | None, report: DatasetReport | dict[str, Any], limit: int) -> ValidationView:
    raw = dataclasses.asdict(report) if isinstance(report, DatasetReport) else report
    problems = [ProblemView(line=p.get("line"), field=p.get("field"), message=p["message"])
                for p in raw.get("problems", [])[:limit]]
    stats = {k: v for k, v in (raw.get("stats") or {}).items() if k not in ("longest_lines", "sample_lines")}
    return ValidationView(ok=bool(raw.get("ok")), dataset=dataset_view(dataset) if dataset else None,
                          problems=problems, problems_total=raw.get("problems_total", len(problems)), stats=stats)


def validate_dataset(ctx: ServiceContext, agent: Agent, request: ValidateDatasetRequest) -> ValidationView:
    dataset = datasets.get(ctx.engine, agent.id, request.dataset_id)
    return validation_view(dataset, dataset.report, request.limit)


TOOL = Tool(
    toolset="inspect", name="validate_dataset", request=ValidateDatasetRequest, result=ValidationView,
    function=validate_dataset,
    access="read",
    description="A dataset's validation (problems with line and field, counts, token statistics) and, for a "
                "generated one, its lineage.",
    route=Route("GET", "/datasets/{dataset_id}"),
    command=Command(("datasets", "show"), args=("dataset_id",)))
