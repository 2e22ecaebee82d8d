"""Who is calling: the one reading of an `Authorization` header, for REST, MCP over HTTP and the
OpenAI-compatible endpoint alike. Over stdio (and in memory) there is no header: the caller is the
configured local agent, or the agent of `WEIGHTSMITH_LOCAL_AGENT_KEY`."""

from __future__ import annotations

from server.context import ServiceContext
from server.errors import Unauthorized
from server.store import agents
from server.store.tables import Agent

HOW = "send 'Authorization: Bearer <key>' (a key from 'weightsmith agents add NAME')"


def bearer_key(header: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; the scheme is case-insensitive (RFC 7235)."""
    if not header or not header.strip():
        raise Unauthorized(f"missing API key: {HOW}")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(f"the Authorization header is not a bearer key: {HOW}")
    return key.strip()


def agent_for_header(ctx: ServiceContext, header: str | None) -> Agent:
    return agents.agent_for_key(ctx.engine, bearer_key(header))


def local_agent(ctx: ServiceContext, local_key: str | None = None) -> Agent:
    key = local_key or ctx.settings.local_agent_key
    return agents.agent_for_key(ctx.engine, key) if key else agents.ensure_local_agent(ctx.engine, ctx.settings)
