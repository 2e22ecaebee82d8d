"""Agent identities and API keys. Keys are shown once and stored only as SHA-256 hashes.

A key is `ws_` + 32 random bytes (urlsafe): long enough that a fast unsalted hash is safe to
store, and a plain hash keeps look-up a single indexed query.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from server.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from server.settings import Settings
from server.store.db import write_transaction
from server.store.tables import Agent

LIMIT_FIELDS = (
    "max_request_flops", "max_request_seconds", "max_request_params", "max_request_tokens",
    "max_dataset_bytes", "budget_flops", "budget_window_seconds", "max_concurrent_jobs",
)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def default_limits(settings: Settings) -> dict[str, float | int]:
    return {name: getattr(settings, f"default_{name}") for name in LIMIT_FIELDS}


def create_agent(engine: Engine, settings: Settings, name: str, **limits: float | None) -> tuple[Agent, str]:
    """Create an agent and return it with its API key, which is not recoverable afterwards."""
    key = "ws_" + secrets.token_urlsafe(32)
    values = default_limits(settings) | {k: v for k, v in limits.items() if v is not None}
    with write_transaction(engine) as session:
        if session.exec(select(Agent).where(Agent.name == name)).first():
            raise Conflict(f"an agent named {name!r} exists; pick another name", param="name")
        agent = Agent(name=name, key_hash=hash_key(key), **values)
        session.add(agent)
    return agent, key


def ensure_local_agent(engine: Engine, settings: Settings) -> Agent:
    """The identity of a caller over stdio without a key: the operator's own machine.

    Every service start makes it if missing. Starts at once on PostgreSQL may all find it missing (its
    reads take no lock); the unique name lets one insert win, and the others read the winner's."""
    try:
        with write_transaction(engine) as session:
            agent = session.exec(select(Agent).where(Agent.name == settings.local_agent)).first()
            if agent is None:
                agent = Agent(name=settings.local_agent, **default_limits(settings))
                session.add(agent)
    except IntegrityError:
        with Session(engine, expire_on_commit=False) as session:
            agent = session.exec(select(Agent).where(Agent.name == settings.local_agent)).one()
    return agent


def agent_for_key(engine: Engine, key: str) -> Agent:
    """The key's agent, read on every call, so a revoked or rotated key is refused at once."""
    with Session(engine, expire_on_commit=False) as session:
        agent = session.exec(select(Agent).where(Agent.key_hash == hash_key(key))).first()
    if agent is None:
        raise Unauthorized("unknown or revoked API key; an operator issues one with 'weightsmith agents add NAME' "
                           "or 'weightsmith agents rotate NAME'")
    return agent


def rotate_key(engine: Engine, name: str) -> tuple[Agent, str]:
    """A new key for the agent; its old key is refused from now on."""
    key = "ws_" + secrets.token_urlsafe(32)
    with write_transaction(engine) as session:
        agent = _named(session, name)
        agent.key_hash, agent.revoked_at = hash_key(key), None
        session.add(agent)
    return agent, key


def revoke_key(engine: Engine, name: str) -> Agent:
    """Refuse the agent's key from now on; its jobs, models and data stay (rotate_key issues a new key)."""
    with write_transaction(engine) as session:
        agent = _named(session, name)
        agent.key_hash, agent.revoked_at = None, time.time()
        session.add(agent)
    return agent


def set_limits(engine: Engine, name: str, limits: dict[str, float]) -> Agent:
    """Change some of an agent's limits; they hold from its next request (running jobs keep theirs)."""
    unknown = sorted(set(limits) - set(LIMIT_FIELDS))
    if unknown:
        raise InvalidRequest(f"{unknown[0]} is not a limit; the limits are {', '.join(LIMIT_FIELDS)}", param=unknown[0])
    bad = [field for field, value in limits.items() if not value > 0 or value == float("inf")]
    if bad:
        raise InvalidRequest(f"{bad[0]} must be a positive number", param=bad[0])
    with write_transaction(engine) as session:
        agent = _named(session, name)
        for field, value in limits.items():
            setattr(agent, field, int(value) if field in INTEGER_LIMITS else value)
        session.add(agent)
    return agent


INTEGER_LIMITS = ("max_request_params", "max_request_tokens", "max_dataset_bytes", "max_concurrent_jobs")


def _named(session: Session, name: str) -> Agent:
    agent = session.exec(select(Agent).where(Agent.name == name)).first()
    if agent is None:
        known = ", ".join(a.name for a in session.exec(select(Agent))) or "none"
        raise NotFound(f"no agent named {name!r}; agents: {known}", param="name")
    return agent
