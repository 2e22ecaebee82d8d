"""What a tool is: one definition from which MCP, REST and the CLI are registered.

A tool module (`tools/<name>.py`) holds its request model (every field described), its result
model, its model-facing description and one plain function, and ends with `TOOL = Tool(...)`.
`tools/__init__.py` lists them; `server/api/mcp.py`, `server/api/rest.py` and `server/cli/` read
that list and nothing else, so adding a tool means one module and its tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from server.admission.requests import RequestModel, drop_property_titles
from server.context import ServiceContext
from server.store.tables import Agent

Access = Literal["read", "write", "idempotent_write", "destructive"]
"""How a call touches the service: MCP annotations and the CLI's confirmations read it."""
ProgressReporter = Callable[[float, float | None, str], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)


class ToolRequest(RequestModel):
    """Base of every tool's request: unknown fields and NaN/Infinity are refused, naming the field."""


class ToolResult(BaseModel):
    """Base of every tool's result. `summary()` is what the CLI prints for people; agents get the
    structure (and its compact JSON as the text of an MCP result)."""

    model_config = ConfigDict(json_schema_extra=drop_property_titles)

    def summary(self) -> str:
        return self.compact_json()

    def compact_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), separators=(",", ":"))


@dataclass(frozen=True)
class Route:
    """The tool's REST route under /v1. Fields named in `path` come from the path; the others from
    the query string for GET, from a JSON body otherwise (which may be left out when every field
    has a default)."""

    method: Literal["GET", "POST", "DELETE"]
    path: str


@dataclass(frozen=True)
class Command:
    """The tool's CLI command (`weightsmith jobs show JOB_ID`): `args` are positional, every other
    request field is an option. `prepare` turns what the command line gave into the request, for
    commands that take something other than the fields (a file to upload); `inputs` are its extra
    positional arguments, with their help."""

    path: tuple[str, ...]
    args: tuple[str, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None


ToolFunction = Callable[[ServiceContext, Agent, Any], BaseModel]
WaitingFunction = Callable[[ServiceContext, Agent, Any, ProgressReporter | None], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    """For the model that calls it: what it does, when to use it, what comes back. Short."""
    request: type[ToolRequest]
    result: type[ToolResult]
    function: ToolFunction | WaitingFunction
    access: Access
    route: Route
    command: Command | None = None
    waits: bool = False
    """`function` is async and takes a progress reporter (it waits for a job)."""
    toolset: str = "core"
    """Which MCP tool list it is in (`weightsmith serve --toolsets`); REST and the CLI have them all."""

    def path_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.route.path)

    def takes_query(self) -> bool:
        """Whether the fields not in the path travel in the query string (else in a JSON body)."""
        return self.route.method == "GET"


def one_or_many(value: Any) -> Any:
    """For list fields: a single value is taken as a list of one (`state: "running"`)."""
    return [value] if isinstance(value, str) else value


def as_core(model: type[M], request: BaseModel) -> M:
    """The core's request inside a tool's (which adds what only a call carries: dry_run, a key), with
    only the fields the caller set, so defaults that depend on being left out stay left out."""
    return model.model_validate(request.model_dump(include=set(model.model_fields), exclude_unset=True))
