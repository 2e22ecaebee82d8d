"""The HTTP service: REST under /v1, MCP (streamable HTTP) at /mcp, the OpenAI-compatible API under
/openai/v1 (an agent's own models), OpenAPI docs at /docs.

    weightsmith serve            # or: uvicorn --factory server.api.app:create_app
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import auth
from server.api.errors import as_weightsmith, rest_body
from server.api.mcp import DEFAULT_TOOLSETS, build_mcp_server
from server.api.openai import build_openai_router
from server.api.rest import build_router
from server.context import ServiceRef
from server.errors import Unauthorized, WeightsmithError
from server.service import open_service
from server.settings import Settings


def create_app(settings: Settings | None = None, *, workers: bool = True,
               toolsets: Sequence[str] = DEFAULT_TOOLSETS) -> FastAPI:
    settings = settings or Settings()
    service = ServiceRef()
    mcp = build_mcp_server(service, toolsets=toolsets)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp", host=settings.host,
        transport_security=TransportSecuritySettings(allowed_hosts=settings.allowed_hosts,
                                                     allowed_origins=[f"http://{h}" for h in settings.allowed_hosts]))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        with open_service(settings, workers=workers) as ctx:
            service.ctx = ctx
            try:
                async with mcp.session_manager.run():  # the host app's lifespan must run MCP's sessions
                    yield
            finally:
                if ctx.serving is not None:
                    await ctx.serving.aclose()
                service.ctx = None

    app = rest_app(service, lifespan=lifespan)
    # Last, so /v1 and /docs match first; the MCP app answers /mcp itself.
    app.router.routes.append(Mount("/", app=_RequireKey(mcp_app, service)))
    return app


def rest_app(service: ServiceRef, lifespan: Any = None) -> FastAPI:
    """The REST API alone, over a service opened elsewhere (by `create_app`'s lifespan, or a test's)."""
    app = FastAPI(title="weightsmith", version="0.1.0", lifespan=lifespan,
                  description="Train and own domain models. MCP at /mcp; REST below. Every error is "
                              '{"error": {"code", "message", "param"}}.')
    app.state.service = service
    app.include_router(build_router())
    app.include_router(build_openai_router())
    # HTTPException: FastAPI's own refusals (no route, wrong method, unreadable body) answered in our form too.
    for kind in (WeightsmithError, ValidationError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, error_handler)
    return app


async def error_handler(_request: Request, err: Exception) -> JSONResponse:
    error = as_weightsmith(err)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthorized) else None
    if isinstance(err, HTTPException) and err.headers:
        headers = dict(err.headers)  # the Allow header of a 405
    return JSONResponse(status_code=error.http_status, content=rest_body(error), headers=headers)


class _RequireKey:
    """Refuses MCP requests without a valid bearer key before a session is created."""

    def __init__(self, app: ASGIApp, service: ServiceRef):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/mcp"):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                auth.agent_for_header(self.service.get(), header)
            except Unauthorized as err:
                body = json.dumps(rest_body(err)).encode("utf-8")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
