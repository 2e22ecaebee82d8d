"""create_eval_suite: declare what "better" means: a dataset of items, KPIs with graders and
thresholds, a composite. Every problem of a definition is reported at once."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from server.context import ServiceContext
from server.evaluation import suites
from server.store.tables import Agent, EvalSuite
from tools.base import Command, Route, Tool, ToolRequest, ToolResult


class CreateEvalSuiteRequest(ToolRequest):
    definition: str | dict[str, Any] = Field(description=(
        "YAML or JSON (text or object): name; dataset (ds_..., prompt/completion or chat records: the completion "
        "is the reference); kpis: [{name, grader: {type: exact|contains|regex|json_schema|length|similarity|"
        "perplexity|tool_call|python, ...}, threshold?, direction? (higher|lower), allowed_regression?, "
        "aggregation? (mean|median|p10|p90)}]; composite? (a formula over KPI names); cluster_key? (metadata "
        "field of items resampled together); max_items?; decoding? {max_new_tokens, batch_size}."))


class SuiteView(ToolResult):
    id: str
    name: str
    items: int
    kpis: list[str]

    def summary(self) -> str:
        return f"{self.id}  {self.name}  {self.items} items  KPIs: {', '.join(self.kpis)}"


def suite_view(row: EvalSuite) -> SuiteView:
    return SuiteView(id=row.id, name=row.name, items=row.items, kpis=[kpi["name"] for kpi in row.definition["kpis"]])


def create_eval_suite(ctx: ServiceContext, agent: Agent, request: CreateEvalSuiteRequest) -> SuiteView:
    raw = suites.parse_definition(request.definition) if isinstance(request.definition, str) else request.definition
    return suite_view(suites.create_suite(ctx.engine, agent.id, raw))


def _from_file(given: dict[str, Any]) -> dict[str, Any]:
    with open(given.pop("file"), encoding="utf-8") as handle:
        return {**given, "definition": handle.read()}


TOOL = Tool(
    name="create_eval_suite", request=CreateEvalSuiteRequest, result=SuiteView, function=create_eval_suite,
    access="idempotent_write",
    description="Store an eval suite (the same definition on the same data returns the same suite); then "
                "run_eval, or launch_training with eval_suite.",
    route=Route("POST", "/eval-suites"),
    command=Command(("eval", "suite"), args=("file",), inputs={"file": "The suite's YAML or JSON file."},
                    prepare=_from_file))
