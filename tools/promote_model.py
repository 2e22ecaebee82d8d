"""promote_model: point an alias (production, staging, ...) at a model, or roll it back one move."""

from __future__ import annotations

from pydantic import Field, model_validator
from sqlmodel import Session

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store import aliases
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.views import iso


class PromoteModelRequest(ToolRequest):
    alias: str = Field(description="The alias: production, staging, or any name; used as alias:NAME anywhere a "
                       "model id is.")
    model: str | None = Field(None, description="The model it moves to (mdl_... or alias:OTHER).")
    report_id: str | None = Field(None, description="The eval report (of that model) it moves on the strength of.")
    rollback: bool = Field(False, description="Move the alias back to the model it held before its last move.")

    @model_validator(mode="after")
    def _model_or_rollback(self) -> PromoteModelRequest:
        if self.rollback == (self.model is not None):
            raise ValueError("give model (to promote) or rollback: true, not both")
        return self


class AliasView(ToolResult):
    alias: str
    model_id: str
    previous_model_id: str | None
    action: str = Field(description="promote or rollback.")
    moved_by: str
    moved_at: str | None
    history: list[str] = Field(description="The alias's recent moves, newest first.")

    def summary(self) -> str:
        return (f"{self.alias} -> {self.model_id} ({self.action}, was {self.previous_model_id or 'unset'})\n"
                + "\n".join(f"  {line}" for line in self.history))


def promote_model(ctx: ServiceContext, agent: Agent, request: PromoteModelRequest) -> AliasView:
    if request.rollback:
        event = aliases.rollback(ctx.engine, agent.id, request.alias, moved_by=agent.name)
    else:
        assert request.model is not None
        with Session(ctx.engine) as session:
            model = aliases.resolve_model(session, agent.id, request.model, "model")
        if model is None:
            raise InvalidRequest(f"{request.model!r} is not a model id (mdl_...) or alias:NAME", param="model")
        event = aliases.promote(ctx.engine, agent.id, request.alias, model.id, report_id=request.report_id,
                                moved_by=agent.name)
    with Session(ctx.engine) as session:
        moves = aliases.history(session, agent.id, request.alias, 5)
    return AliasView(alias=request.alias, model_id=event.model_id, previous_model_id=event.previous_model_id,
                     action=event.action, moved_by=event.moved_by, moved_at=iso(event.created_at),
                     history=[f"{iso(m.created_at)} {m.action} {m.model_id} by {m.moved_by}"
                              + (f" on {m.report_id}" if m.report_id else "") for m in moves])


TOOL = Tool(
    name="promote_model", request=PromoteModelRequest, result=AliasView, function=promote_model,
    access="write",
    description="Move an alias (production, staging, ...) to a model, recording who, when, from which model and "
                "on which eval report; or roll it back to its previous model. alias:NAME then works anywhere a "
                "model id does.",
    route=Route("POST", "/aliases/{alias}"), command=Command(("aliases", "promote"), args=("alias",)))
