"""list_eval_suites: the agent's eval suites, newest first."""

from __future__ import annotations

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.store.tables import Agent, EvalSuite
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.create_eval_suite import SuiteView, suite_view


class ListEvalSuitesRequest(ToolRequest):
    limit: int = Field(20, ge=1, le=100, description="Suites listed.")


class SuiteList(ToolResult):
    suites: list[SuiteView]

    def summary(self) -> str:
        return "\n".join(s.summary() for s in self.suites) or "no eval suites"


def list_eval_suites(ctx: ServiceContext, agent: Agent, request: ListEvalSuitesRequest) -> SuiteList:
    with Session(ctx.engine) as session:
        rows = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent.id)
                            .order_by(col(EvalSuite.created_at).desc()).limit(request.limit))
        return SuiteList(suites=[suite_view(row) for row in rows])


TOOL = Tool(
    name="list_eval_suites", request=ListEvalSuitesRequest, result=SuiteList, function=list_eval_suites,
    access="read", description="Your eval suites, newest first: id, name, items, KPIs.",
    route=Route("GET", "/eval-suites"), command=Command(("eval", "suites")))
