"""list_models: the agent's registered models with their lineage."""

from __future__ import annotations

from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.store.tables import Agent, Model
from tools.views import Compact, ModelView, model_view


class ModelList(Compact):
    models: list[ModelView]


def list_models(ctx: ServiceContext, agent: Agent, limit: int = 20) -> ModelList:
    with Session(ctx.engine) as session:
        rows = session.exec(select(Model).where(Model.agent_id == agent.id)
                            .order_by(col(Model.created_at).desc()).limit(max(1, min(limit, 100))))
        return ModelList(models=[model_view(m) for m in rows])
