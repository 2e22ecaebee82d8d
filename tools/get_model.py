"""get_model: one model whole: its lineage back to its root, the data it was trained on by id and
hash, its resolved settings, metrics and alias history."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store import aliases
from server.store.tables import Agent, AliasEvent, Dataset, Model
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import ModelView, iso, model_view, scalars


class GetModelRequest(ToolRequest):
    model: str = Field(description="A model id (mdl_...) or alias:NAME.")


class ModelDetail(ToolResult):
    model: ModelView
    lineage: list[str] = Field(description="This model, its parent, ... back to its root (a directory or scratch).")
    datasets: list[dict[str, Any]] = Field(description="What it was trained on: id, name, content hash.")
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    path: str = Field(description="Its Hugging Face directory (the adapter, for a LoRA model).")
    merged_path: str | None = None
    promotions: list[dict[str, Any]] = Field(description="Recent moves of aliases to or from it.")

    def summary(self) -> str:
        lines = [self.model.summary(), f"  lineage: {' <- '.join(self.lineage)}",
                 f"  data: {', '.join(d['id'] + ' ' + d['content_hash'][:12] for d in self.datasets)}",
                 f"  path: {self.path}"]
        lines += [f"  {k}={v}" for k, v in list(self.metrics.items())[:16]]
        return "\n".join(lines)


def get_model(ctx: ServiceContext, agent: Agent, request: GetModelRequest) -> ModelDetail:
    with Session(ctx.engine) as session:
        model = aliases.resolve_model(session, agent.id, request.model, "model")
        if model is None:
            raise InvalidRequest(f"{request.model!r} is not a model id (mdl_...) or alias:NAME", param="model")
        chain = [model.id]
        parent, seen = model, {model.id}
        while parent.parent_model_id and parent.parent_model_id not in seen:
            found = session.get(Model, parent.parent_model_id)
            if found is None:
                break
            chain.append(found.id)
            seen.add(found.id)
            parent = found
        chain.append(parent.base_model if parent.base_model not in seen else "")
        trained_on = session.exec(select(Dataset).where(
            Dataset.agent_id == agent.id, col(Dataset.content_hash).in_(model.dataset_hashes))).all()
        moves = session.exec(select(AliasEvent).where(
            AliasEvent.agent_id == agent.id,
            (AliasEvent.model_id == model.id) | (AliasEvent.previous_model_id == model.id),
        ).order_by(col(AliasEvent.id).desc()).limit(5)).all()
        named = sorted(n for n, target in aliases.of_agent(session, agent.id).items() if target == model.id)
    return ModelDetail(
        model=model_view(model, named), lineage=[link for link in chain if link],
        datasets=[{"id": d.id, "name": d.name, "content_hash": d.content_hash} for d in trained_on],
        hyperparameters=model.config.get("hyperparameters", {}), metrics=scalars(model.metrics),
        path=model.path, merged_path=model.merged_path,
        promotions=[{"alias": e.alias, "action": e.action, "to": e.model_id, "from": e.previous_model_id,
                     "report_id": e.report_id, "by": e.moved_by, "at": iso(e.created_at)} for e in moves])


TOOL = Tool(
    toolset="inspect", name="get_model", request=GetModelRequest, result=ModelDetail, function=get_model,
    access="read",
    description="One model whole: lineage back to its root, datasets by id and hash, resolved hyperparameters, "
                "metrics, path, and recent alias moves.",
    route=Route("GET", "/models/{model}"), command=Command(("models", "show"), args=("model",)))
