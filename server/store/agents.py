"""Agent identities and API keys. Keys are shown once and stored only as SHA-256 hashes.

A key is `ws_` + 32 random bytes (urlsafe): long enough that a fast unsalted hash is safe to
store, and a plain hash keeps look-up a single indexed query.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import Engine
from sqlmodel import Session, select

from server.errors import Conflict, Unauthorized
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
    """The identity of a caller over stdio without a key: the operator's own machine."""
    with write_transaction(engine) as session:
        agent = session.exec(select(Agent).where(Agent.name == settings.local_agent)).first()
        if agent is None:
            agent = Agent(name=settings.local_agent, **default_limits(settings))
            session.add(agent)
    return agent


def agent_for_key(engine: Engine, key: str | None) -> Agent:
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (weightsmith agents add NAME)")
    with Session(engine, expire_on_commit=False) as session:
        agent = session.exec(select(Agent).where(Agent.key_hash == hash_key(key))).first()
    if agent is None:
        raise Unauthorized("unknown API key; create one with 'weightsmith agents add NAME'")
    return agent
