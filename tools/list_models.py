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
    openai_base_url: str = Field(description="Use a model like any other: the openai client with this base_url, "
                                 "your key as api_key, and a model id, name or alias as model.")

    def summary(self) -> str:
        listed = "\n".join(m.summary() for m in self.models) or "no models"
        return f"{listed}\nOpenAI-compatible endpoint: {self.openai_base_url} (model: an id, name or alias)"


def list_models(ctx: ServiceContext, agent: Agent, request: ListModelsRequest) -> ModelList:
    with Session(ctx.engine) as session:
        named = aliases.of_agent(session, agent.id)
        rows = session.exec(select(Model).where(Model.agent_id == agent.id)
                            .order_by(col(Model.created_at).desc()).limit(request.limit))
        views = [model_view(m, sorted(n for n, target in named.items() if target == m.id)) for m in rows]
    return ModelList(models=views, aliases=named, openai_base_url=openai_base_url(ctx))


def openai_base_url(ctx: ServiceContext) -> str:
    settings = ctx.settings
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/") + "/openai/v1"


TOOL = Tool(
    name="list_models", request=ListModelsRequest, result=ModelList, function=list_models, access="read",
    description="Your registered models, newest first: id, adapter, base model, datasets by hash, job, "
                "parameters, headline metrics, your aliases, and the OpenAI-compatible base URL to use them at.",
    route=Route("GET", "/models"), command=Command(("models", "list")))
