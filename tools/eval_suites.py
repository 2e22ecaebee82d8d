"""create_eval_suite and list_eval_suites: declare what an evaluation measures, once per agent."""

from __future__ import annotations

import json
from typing import Any

import yaml
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.evaluation import evals as evaluation
from server.store.tables import Agent, EvalSuite
from tools.views import Compact


class SuiteView(Compact):
    id: str
    name: str
    items: int
    kpis: list[str]


class SuiteList(Compact):
    suites: list[dict[str, Any]]


def create_eval_suite(ctx: ServiceContext, agent: Agent, definition: str | dict[str, Any]) -> SuiteView:
    """Validate a suite (YAML or JSON text, or an object) and store it; every problem is reported."""
    raw = parse_definition(definition) if isinstance(definition, str) else definition
    return suite_view(evaluation.create_suite(ctx.engine, agent.id, raw))


def list_eval_suites(ctx: ServiceContext, agent: Agent, limit: int = 20) -> SuiteList:
    with Session(ctx.engine) as session:
        rows = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent.id)
                            .order_by(col(EvalSuite.created_at).desc()).limit(max(1, min(limit, 100))))
        return SuiteList(suites=[suite_view(row).model_dump() for row in rows])


def parse_definition(text: str) -> dict[str, Any]:
    """JSON or YAML text (JSON is YAML, but its own parser gives clearer errors for it)."""
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"definition is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}",
                             param="definition") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # only some YAML errors carry a position
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise InvalidRequest(f"definition is not valid YAML: {where}{getattr(err, 'problem', err)}",
                             param="definition") from err
    if not isinstance(raw, dict):
        raise InvalidRequest("definition must be a mapping with name, dataset and kpis", param="definition")
    return raw


def suite_view(row: EvalSuite) -> SuiteView:
    return SuiteView(id=row.id, name=row.name, items=row.items,
                     kpis=[kpi["name"] for kpi in row.definition["kpis"]])
