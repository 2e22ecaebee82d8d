"""list_models: the agent's registered models, newest first, with their aliases and lineage."""

from __future__ import annotations

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.store import aliases
from server.store.tables import Agent, Model
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import ModelView, model_view


class ListModelsRequest(ToolRequest):
    limit: int = Field(20, ge=1, le=100, description="Models listed.")


class ModelList(ToolResult):
    models: list[ModelView]
    aliases: dict[str, str] = Field(description="Your aliases: name -> model id (use as alias:NAME).")

    def summary(self) -> str:
        return "\n".join(m.summary() for m in self.models) or "no models"


def list_models(ctx: ServiceContext, agent: Agent, request: ListModelsRequest) -> ModelList:
    with Session(ctx.engine) as session:
        named = aliases.of_agent(session, agent.id)
        rows = session.exec(select(Model).where(Model.agent_id == agent.id)
                            .order_by(col(Model.created_at).desc()).limit(request.limit))
        views = [model_view(m, sorted(n for n, target in named.items() if target == m.id)) for m in rows]
    return ModelList(models=views, aliases=named)


TOOL = Tool(
    name="list_models", request=ListModelsRequest, result=ModelList, function=list_models, access="read",
    description="Your registered models, newest first: id, adapter, base model, datasets by hash, job, "
                "parameters, headline metrics, and your aliases.",
    route=Route("GET", "/models"), command=Command(("models", "list")))
