"""Model aliases and promotion: `alias:NAME` names whichever model the agent last promoted to NAME.

A promotion moves an alias atomically (one transaction, the alias row locked) and records who moved
it, when, from which model to which, and on which eval report; a rollback moves it back to the model
it held before its last move, recorded the same way. An agent sees only its own aliases.
"""

from __future__ import annotations

import re
import time

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.errors import InvalidRequest, NotFound
from server.store.db import is_sqlite, owned, write_transaction
from server.store.tables import Alias, AliasEvent, EvalReport, Model

PREFIX = "alias:"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, param: str = "alias") -> str:
    if not NAME.match(name):
        raise InvalidRequest(f"{name!r} is not an alias name: letters, digits, '_', '.', '-', at most 64, "
                             "starting with a letter or digit (e.g. production)", param=param)
    return name


def resolve_model(session: Session, agent_id: str, ref: str, param: str) -> Model | None:
    """The agent's model named by `ref` (an id `mdl_...` or `alias:NAME`), or None when `ref` is
    neither (a model directory, which the caller resolves)."""
    if ref.startswith(PREFIX):
        name = ref.removeprefix(PREFIX)
        alias = session.exec(select(Alias).where(Alias.agent_id == agent_id, Alias.name == name)).first()
        if alias is None:
            known = ", ".join(a.name for a in session.exec(select(Alias).where(Alias.agent_id == agent_id)))
            raise NotFound(f"no alias {name!r}; your aliases: {known or 'none yet (promote_model makes one)'}",
                           param=param)
        return owned(session, Model, alias.model_id, agent_id, param)
    if ref.startswith("mdl_"):
        return owned(session, Model, ref, agent_id, param)
    return None


def promote(engine: Engine, agent_id: str, name: str, model_id: str, *, report_id: str | None = None,
            moved_by: str, reason: str = "") -> AliasEvent:
    """Point `name` at the model (creating the alias), recording the move."""
    check_name(name)
    with write_transaction(engine) as session:
        model = owned(session, Model, model_id, agent_id, "model")
        if report_id is not None:
            report = owned(session, EvalReport, report_id, agent_id, "report_id")
            if report.model_id != model.id:
                raise InvalidRequest(f"report {report_id} evaluated {report.model_ref}, not {model.id}; name the "
                                     "report of the model you promote", param="report_id")
        alias = _locked(session, engine, agent_id, name)
        previous = alias.model_id if alias else None
        if alias is None:
            alias = Alias(agent_id=agent_id, name=name, model_id=model.id)
        alias.model_id, alias.updated_at = model.id, time.time()
        session.add(alias)
        event = AliasEvent(agent_id=agent_id, alias=name, action="promote", model_id=model.id,
                           previous_model_id=previous, report_id=report_id, moved_by=moved_by, reason=reason)
        session.add(event)
        return event


def rollback(engine: Engine, agent_id: str, name: str, *, moved_by: str) -> AliasEvent:
    """Move `name` back to the model it held before its last move."""
    with write_transaction(engine) as session:
        alias = _locked(session, engine, agent_id, name)
        if alias is None:
            raise NotFound(f"no alias {name!r}; list_models shows your aliases", param="alias")
        last = session.exec(select(AliasEvent).where(AliasEvent.agent_id == agent_id, AliasEvent.alias == name)
                            .order_by(col(AliasEvent.id).desc())).first()
        if last is None or last.previous_model_id is None:
            raise InvalidRequest(f"alias {name!r} has never pointed at another model; there is nothing to roll "
                                 "back to", param="alias")
        alias.model_id, alias.updated_at = last.previous_model_id, time.time()
        session.add(alias)
        event = AliasEvent(agent_id=agent_id, alias=name, action="rollback", model_id=last.previous_model_id,
                           previous_model_id=last.model_id, moved_by=moved_by,
                           reason=f"rolled back from {last.model_id}")
        session.add(event)
        return event


def of_agent(session: Session, agent_id: str) -> dict[str, str]:
    """Alias name -> model id, for the agent's models."""
    return {a.name: a.model_id for a in session.exec(select(Alias).where(Alias.agent_id == agent_id))}


def history(session: Session, agent_id: str, name: str, limit: int = 10) -> list[AliasEvent]:
    return list(session.exec(select(AliasEvent).where(AliasEvent.agent_id == agent_id, AliasEvent.alias == name)
                             .order_by(col(AliasEvent.id).desc()).limit(limit)))


def _locked(session: Session, engine: Engine, agent_id: str, name: str) -> Alias | None:
    query = select(Alias).where(Alias.agent_id == agent_id, Alias.name == name)
    if not is_sqlite(engine):  # SQLite's write transaction already holds the database's lock
        query = query.with_for_update()
    return session.exec(query).first()
