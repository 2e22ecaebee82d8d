"""The MCP transport, registered from `tools.TOOLS`: each tool's request model is its input schema,
its description the model-facing text; a call is validated, run off the event loop and answered with
the result's structure and its compact JSON as text. Errors come back as tool errors in our words
(`server/api/errors.py`).

Over stdio (and in memory) the caller is the configured local agent (or the agent of
WEIGHTSMITH_LOCAL_AGENT_KEY); over HTTP it is the agent whose bearer key the request carries.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from mcp_types import Tool as MCPTool
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from server.api import auth
from server.api.errors import as_weightsmith
from server.api.schemas import compact_schema
from server.context import ServiceContext, ServiceRef
from server.errors import NotFound, WeightsmithError, invalid_request
from server.store.tables import Agent
from tools import TOOLS, Tool
from tools.base import ToolResult
from tools.get_job import GetJobRequest, get_job
from tools.read_eval_report import ReadEvalReportRequest, read_eval_report, read_eval_report_html
from tools.tune_hyperparameters import study_trials

# Only what differs from MCP's defaults (readOnly false, destructive true, idempotent false, openWorld true);
# destructive and idempotent mean nothing on a read-only tool. Every hint costs tokens in every tool list.
ANNOTATIONS = {
    "read": ToolAnnotations(readOnlyHint=True, openWorldHint=False),
    "write": ToolAnnotations(destructiveHint=False, openWorldHint=False),
    "idempotent_write": ToolAnnotations(destructiveHint=False, idempotentHint=True, openWorldHint=False),
    "destructive": ToolAnnotations(idempotentHint=True, openWorldHint=False),
}
INSTRUCTIONS = (
    "weightsmith trains models on your data within your compute limits. Flow: upload_dataset (check ok) -> "
    "launch_training (dry_run first to see the price) -> wait_for_job (repeat until it ends) -> list_models; "
    "evaluate with create_eval_suite and run_eval. Jobs run in the background; no call blocks long."
)
DEFAULT_TOOLSETS = ("core",)


class WeightsmithMCP(MCPServer):
    """An MCP server whose tools are `tools.TOOLS` (those of the selected toolsets)."""

    def __init__(self, service: ServiceRef, tools: Sequence[Tool], local_key: str | None):
        super().__init__("weightsmith", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING")
        self.service, self.local_key = service, local_key
        self.by_name = {tool.name: tool for tool in tools}
        self.listed = [MCPTool(name=tool.name, description=tool.description,
                               input_schema=compact_schema(tool.request.model_json_schema()),
                               annotations=ANNOTATIONS[tool.access]) for tool in tools]

    async def list_tools(self) -> list[MCPTool]:
        return self.listed

    def _tool_input_schema(self, name: str) -> dict[str, Any] | None:
        tool = self.by_name.get(name)
        return None if tool is None else tool.request.model_json_schema()

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None
                        ) -> CallToolResult:  # type: ignore[override]
        tool = self.by_name.get(name)
        try:
            if tool is None:
                raise NotFound(f"no tool {name!r}; the tools are: {', '.join(self.by_name)}", param="name")
            ctx = self.service.get()
            agent = await anyio.to_thread.run_sync(self.caller, ctx, context)
            request = tool.request.model_validate(arguments)
            result = await run_tool(tool, ctx, agent, request, context)
        except Exception as exc:  # noqa: BLE001 -- every failure is answered in our words
            error = invalid_request(exc, model=tool.request) if isinstance(exc, ValidationError) and tool \
                else as_weightsmith(exc)
            return CallToolResult(content=[TextContent(type="text", text=str(error))],
                                  structured_content={"error": error.to_dict()}, is_error=True)
        return CallToolResult(content=[TextContent(type="text", text=result.compact_json())],
                              structured_content=result.model_dump(mode="json"))

    def caller(self, ctx: ServiceContext, context: Context | None) -> Agent:
        request = context.request_context.request if context is not None else None
        if not isinstance(request, Request):  # stdio and in memory: no HTTP request
            return auth.local_agent(ctx, self.local_key)
        return auth.agent_for_header(ctx, request.headers.get("authorization"))


async def run_tool(tool: Tool, ctx: ServiceContext, agent: Agent, request: BaseModel,
                   context: Context | None) -> ToolResult:
    if tool.waits:
        report = context.report_progress if context is not None else None
        return await tool.function(ctx, agent, request, report)  # type: ignore[call-arg,misc]
    return await anyio.to_thread.run_sync(functools.partial(tool.function, ctx, agent, request))  # type: ignore[return-value]


def build_mcp_server(service: ServiceRef, local_key: str | None = None,
                     toolsets: Sequence[str] = DEFAULT_TOOLSETS) -> WeightsmithMCP:
    """`local_key` picks the identity of callers without HTTP headers (stdio, in-memory); `toolsets`
    which tools are listed (`all` for every one)."""
    chosen = [tool for tool in TOOLS if "all" in toolsets or tool.toolset in toolsets]
    mcp = WeightsmithMCP(service, chosen, local_key)

    async def read(context: Context, fn: Any, *args: Any) -> Any:
        try:
            ctx = service.get()
            agent = await anyio.to_thread.run_sync(mcp.caller, ctx, context)
            return await anyio.to_thread.run_sync(functools.partial(fn, ctx, agent, *args))
        except NotFound as err:
            raise ResourceNotFoundError(str(err)) from err
        except WeightsmithError as err:
            raise ResourceError(str(err)) from err

    @mcp.resource("weightsmith://jobs/{job_id}", mime_type="application/json")
    async def job_resource(job_id: str, ctx: Context) -> str:
        """A job as JSON (as get_job gives it)."""
        return (await read(ctx, get_job, GetJobRequest(job_id=job_id))).compact_json()

    @mcp.resource("weightsmith://studies/{study_id}/trials", mime_type="application/json")
    async def study_trials_resource(study_id: str, ctx: Context) -> str:
        """A study's whole trials table (get_job shows its best and newest trials)."""
        return json.dumps({"study_id": study_id, "trials": await read(ctx, study_trials, study_id)})

    # The .html template first: the JSON one would also match "rep_x.html".
    @mcp.resource("weightsmith://reports/{report_id}.html", mime_type="text/html")
    async def report_html_resource(report_id: str, ctx: Context) -> str:
        """An eval report as HTML with plots."""
        return await read(ctx, read_eval_report_html, report_id)

    @mcp.resource("weightsmith://reports/{report_id}", mime_type="application/json")
    async def report_resource(report_id: str, ctx: Context) -> str:
        """An eval report as JSON (as read_eval_report gives it)."""
        return (await read(ctx, read_eval_report, ReadEvalReportRequest(ref=report_id))).compact_json()

    return mcp
