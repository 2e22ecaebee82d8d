"""The OpenAI-compatible API under /openai/v1: an agent's own models, as the official client calls them.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8765/openai/v1", api_key="ws_...")
    client.chat.completions.create(model="production", messages=[...])   # an id, a name or an alias

Routes: POST /chat/completions (the model's own chat template), POST /completions, GET /models.
`stream: true` answers server-sent events in OpenAI's chunk format; every answer carries usage.
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 401 without a valid key, 404
for a model the agent does not have, 400 for a bad or unsupported parameter (named, never ignored),
429 with Retry-After over a limit. The work is in `server/serving/gateway.py`; the engine validates
the generation parameters, so ours and vLLM refuse the same things.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from server.api import auth
from server.api.errors import as_weightsmith, openai_body
from server.context import ServiceContext, ServiceRef
from server.errors import InvalidRequest
from server.serving.gateway import Gateway, Served, gateway_of
from server.store.tables import Agent
from training_core.serving.disconnect import CLIENT_CLOSED_REQUEST, ClientLeft, unless_client_leaves


def _service(request: Request) -> ServiceContext:
    ref: ServiceRef = request.app.state.service
    return ref.get()


Service = Annotated[ServiceContext, Depends(_service)]


def build_openai_router() -> APIRouter:
    # Left out of /openapi.json: OpenAI's own reference documents these routes, and their errors are OpenAI's.
    router = APIRouter(prefix="/openai/v1", include_in_schema=False)

    @router.get("/models")
    async def models(service: Service, authorization: Annotated[str | None, Header()] = None) -> Response:
        try:
            agent = await anyio.to_thread.run_sync(auth.agent_for_header, service, authorization)
            listed = await anyio.to_thread.run_sync(gateway_of(service).listed, agent)
        except Exception as err:  # noqa: BLE001 -- answered in OpenAI's words
            return openai_error(err)
        return JSONResponse({"object": "list", "data": listed})

    @router.post("/chat/completions")
    async def chat_completions(request: Request, service: Service,
                               authorization: Annotated[str | None, Header()] = None) -> Response:
        return await _generate("chat/completions", request, service, authorization)

    @router.post("/completions")
    async def completions(request: Request, service: Service,
                          authorization: Annotated[str | None, Header()] = None) -> Response:
        return await _generate("completions", request, service, authorization)

    return router


async def _generate(route: str, request: Request, service: ServiceContext, authorization: str | None) -> Response:
    gateway: Gateway | None = None
    agent: Agent | None = None
    served: Served | None = None
    try:
        agent = await anyio.to_thread.run_sync(auth.agent_for_header, service, authorization)
        body = await _body(request)
        gateway = gateway_of(service)
        served = await anyio.to_thread.run_sync(gateway.resolve, agent, str(body.get("model") or ""))
        await anyio.to_thread.run_sync(gateway.admit, agent, served, body)
    except Exception as err:  # noqa: BLE001 -- answered in OpenAI's words
        return openai_error(err)
    if body.get("stream"):
        ended: dict[str, Any] = {}  # the usage the stream reported, charged once it is sent
        return StreamingResponse(_relay(gateway, agent, served, route, body, ended), media_type="text/event-stream",
                                 background=BackgroundTask(lambda: gateway.charge(agent, served, ended.get("usage"))))
    try:
        # Cancelling the forward closes the engine's connection, and the engine then stops the rows.
        reply = await unless_client_leaves(request, gateway.forward(route, served, body))
        payload = reply.json()
    except ClientLeft:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        gateway.release(agent)
    usage = payload.get("usage") if reply.status_code == 200 else None
    return JSONResponse(payload, status_code=reply.status_code,
                        background=BackgroundTask(gateway.charge, agent, served, usage))


async def _relay(gateway: Gateway, agent: Agent, served: Served, route: str, body: dict[str, Any],
                 ended: dict[str, Any]) -> AsyncIterator[bytes]:
    try:
        async for piece in gateway.stream(route, served, body):
            if isinstance(piece, bytes):
                yield piece
            elif "usage" in piece:
                ended["usage"] = piece["usage"]
            else:  # the engine refused before streaming: its error, as an event the client raises
                yield f"data: {json.dumps(piece['body'])}\n\n".encode()
    finally:
        gateway.release(agent)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"the body is not valid JSON: {err}", param="body") from err
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", param="body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("model is required: one of your model ids, names or aliases (GET /models)",
                             param="model")
    return body


def openai_error(err: Exception) -> JSONResponse:
    error = as_weightsmith(err)
    status = 400 if error.code in ("invalid_request", "invalid_dataset") else error.http_status
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(error.details.get("retry_after", 1))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(openai_body(error), status_code=status, headers=headers)

