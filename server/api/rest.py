"""The REST transport under /v1, registered from `tools.TOOLS`: a route per tool (`Tool.route`), its
parameters read from the tool's request model, so the OpenAPI document describes every field as the
MCP schema does. Fields named in the path come from the path; the rest from the query string (GET,
and a POST whose other fields are plain values) or a JSON body. Errors are answered by
`server/api/errors.py`'s one mapping.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, create_model
from pydantic.fields import FieldInfo

from server.admission.requests import RequestModel
from server.api import auth
from server.api.errors import ERROR_RESPONSES, ERROR_RESPONSES_BESIDE_HTML
from server.context import ServiceContext, ServiceRef
from server.store.tables import Agent
from tools import TOOLS, Tool
from tools.read_eval_report import read_eval_report_html
from tools.tune_hyperparameters import study_trials


def service_dep(request: Request) -> ServiceContext:
    ref: ServiceRef = request.app.state.service
    return ref.get()


Service = Annotated[ServiceContext, Depends(service_dep)]


def agent_dep(service: Service, authorization: Annotated[str | None, Header()] = None) -> Agent:
    return auth.agent_for_header(service, authorization)


CurrentAgent = Annotated[Agent, Depends(agent_dep)]


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
    _extra_routes(router)  # first: /reports/{id}.html must match before /reports/{ref}
    for tool in TOOLS:
        _add_tool_route(router, tool)
    return router


def _add_tool_route(router: APIRouter, tool: Tool) -> None:
    path_names = tool.path_fields()
    fields = tool.request.model_fields
    rest = {name: field for name, field in fields.items() if name not in path_names}
    in_query = tool.takes_query()
    params = [inspect.Parameter("service", inspect.Parameter.KEYWORD_ONLY, annotation=Service),
              inspect.Parameter("agent", inspect.Parameter.KEYWORD_ONLY, annotation=CurrentAgent)]
    for name in path_names:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            str, PathParam(description=fields[name].description)]))
    if rest:
        model = tool.request if not path_names else _model_of(tool.request, rest)
        optional = not in_query and not any(field.is_required() for field in rest.values())
        where = Query() if in_query else Body()
        kind = model | None if optional else model
        params.append(inspect.Parameter("given", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, where],
                                        default=None if optional else inspect.Parameter.empty))

    async def endpoint(service: ServiceContext, agent: Agent, given: BaseModel | None = None,
                       **path: str) -> BaseModel:
        values = {**(given.model_dump(exclude_unset=True) if given is not None else {}), **path}
        request = tool.request.model_validate(values)
        if tool.waits:
            return await tool.function(service, agent, request, None)  # type: ignore[call-arg,misc]
        return await anyio.to_thread.run_sync(functools.partial(tool.function, service, agent, request))

    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    endpoint.__name__ = tool.name
    router.add_api_route(tool.route.path, endpoint, methods=[tool.route.method], response_model=tool.result,
                         summary=tool.name, description=tool.description,
                         tags=[tool.command.path[0] if tool.command else "tools"], operation_id=tool.name)


def _model_of(request: type[BaseModel], fields: dict[str, FieldInfo]) -> type[BaseModel]:
    """The request without its path fields: what the query string or the body holds."""
    return create_model(f"{request.__name__}Params", __base__=RequestModel,
                        **{name: (field.annotation, field) for name, field in fields.items()})  # type: ignore[call-overload]


def _extra_routes(router: APIRouter) -> None:
    """Reads that are not tools: a whole trials table, and a report as HTML for people."""

    @router.get("/studies/{study_id}/trials", tags=["studies"])
    def get_study_trials(study_id: str, service: Service, agent: CurrentAgent) -> dict[str, Any]:
        return {"study_id": study_id, "trials": study_trials(service, agent, study_id)}

    @router.get("/reports/{report_id}.html", response_class=HTMLResponse, tags=["eval"],
                responses=ERROR_RESPONSES_BESIDE_HTML)
    def get_report_html(report_id: str, service: Service, agent: CurrentAgent) -> HTMLResponse:
        return HTMLResponse(read_eval_report_html(service, agent, report_id))
