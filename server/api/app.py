"""The HTTP service: REST under /v1, MCP (streamable HTTP) at /mcp, OpenAPI docs at /docs.

    weightsmith serve            # or: uvicorn --factory server.api.app:create_app
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.mcp import build_mcp_server
from server.api.rest import error_handler, router
from server.context import ServiceRef, open_service
from server.errors import Unauthorized, WeightsmithError
from server.settings import Settings
from server.store import agents as auth


def create_app(settings: Settings | None = None, *, workers: bool = True) -> FastAPI:
    settings = settings or Settings()
    service = ServiceRef()
    mcp = build_mcp_server(service)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp", host=settings.host,
        transport_security=TransportSecuritySettings(allowed_hosts=settings.allowed_hosts,
                                                     allowed_origins=[f"http://{h}" for h in settings.allowed_hosts]))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        with open_service(settings, workers=workers) as ctx:
            service.ctx = ctx
            async with mcp.session_manager.run():  # the host app's lifespan must run MCP's sessions
                yield
            service.ctx = None

    app = FastAPI(title="weightsmith", version="0.1.0", lifespan=lifespan,
                  description="Train and own domain models. MCP at /mcp; REST below.")
    app.state.service = service
    app.include_router(router)
    app.add_exception_handler(WeightsmithError, error_handler)
    # Last, so /v1 and /docs match first; the MCP app answers /mcp itself.
    app.router.routes.append(Mount("/", app=_RequireKey(mcp_app, service)))
    return app


class _RequireKey:
    """Refuses MCP requests without a valid bearer key before a session is created."""

    def __init__(self, app: ASGIApp, service: ServiceRef):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/mcp"):
            headers = dict(scope.get("headers") or [])
            bearer = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            try:
                auth.agent_for_key(self.service.get().engine, bearer or None)
            except Unauthorized as err:
                body = json.dumps({"error": err.to_dict()}).encode("utf-8")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
