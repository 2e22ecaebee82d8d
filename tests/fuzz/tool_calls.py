"""Property-based calls of every MCP tool, through the real MCP client in memory.

Arguments come from the input schema each tool is listed with: the listed schemas are put in an OpenAPI
document (one operation per tool, the arguments its JSON body) so that schemathesis generates both
arguments the schema admits and arguments it refuses (hypothesis-jsonschema does not run on the
hypothesis that schemathesis needs). Each generated set is sent as it is, then with real ids of the
seeded store in the fields that name objects, then twice more with a mutation (`hostile.mutate`): four
calls, each one case. Every answer must be a success whose structure is the tool's result model, or a
tool error whose text starts with one of our codes and carries no library text.

What it does not cover: the client sends JSON, so a NaN or Infinity argument reaches the server as
null (the REST fuzzer sends them raw); arguments that are not an object are not sent.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from mcp import Client
from mcp_types import CallToolResult
from pydantic import ValidationError
from schemathesis import GenerationMode

from tests.fuzz.hostile import add_real_fields, mutate, substitute_real
from tests.fuzz.outcomes import InternalErrors, Tally, problem_in_error_text
from tests.fuzz.store import real_values
from tests.tools.conftest import Seeded
from tools import BY_NAME, Tool

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def fuzz_tools(seeded: Seeded, tally: Tally, sets_per_tool: int, run_seed: int = 0,
               names: list[str] | None = None, deadline: float = math.inf) -> None:
    """Calls each tool (all, or those `names`) with about `sets_per_tool` generated argument sets, half
    of them admitted by its schema, four calls a set, starting none after `deadline` (time.monotonic());
    failures go to `tally`."""
    with start_blocking_portal() as portal, InternalErrors().installed() as caught, \
            portal.wrap_async_context_manager(seeded.mcp()) as client:
        listed = {t.name: t.input_schema for t in portal.call(client.list_tools).tools}
        assert set(listed) == set(BY_NAME), "the fuzzer calls every tool the server lists"
        operations = {op.ok().path.lstrip("/"): op.ok() for op in
                      schemathesis.openapi.from_dict(_as_openapi(listed)).get_all_operations()}
        for name in names or list(listed):
            for mode in MODES:
                if time.monotonic() > deadline:
                    return
                _fuzz_tool(portal, client, BY_NAME[name], operations[name], mode, seeded, tally, caught,
                           max(1, sets_per_tool // len(MODES)), run_seed)


def _fuzz_tool(portal: BlockingPortal, client: Client, tool: Tool, operation: schemathesis.APIOperation,
               mode: GenerationMode, seeded: Seeded, tally: Tally, caught: InternalErrors, sets: int,
               run_seed: int) -> None:
    target = f"MCP {tool.name}"
    fields = list(operation.body[0].definition["schema"].get("properties", {}))
    real = real_values(seeded, waits=tool.waits)

    @seed(run_seed)
    @settings(max_examples=sets, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), data=st.data())
    def calls(case: schemathesis.Case, data: st.DataObject) -> None:
        if not isinstance(case.body, dict):
            return
        for arguments in _variants(data.draw, case.body, fields, real):
            with tally.case(target):
                try:
                    result = portal.call(client.call_tool, tool.name, arguments)
                except Exception as error:  # noqa: BLE001 -- the transport failed: a finding, not a crash
                    tally.fail(target, "the call raised", str(error), arguments, error)
                    continue
            problem = _problem(tool, result)
            if problem is not None:
                kind, detail = problem
                tally.fail(target, kind, detail, arguments, caught.take() if kind == "internal_error" else None)

    calls()


def _variants(draw: st.DrawFn, generated: dict[str, Any], fields: list[str], real: dict[str, list[Any]]
              ) -> list[dict[str, Any]]:
    """The generated arguments, with real ids, and mutated twice; each distinct one once."""
    with_ids = add_real_fields(draw, substitute_real(draw, generated, real), fields, real)
    variants = [generated, with_ids, mutate(draw, with_ids, real, fields)[0], mutate(draw, with_ids, real, fields)[0]]
    seen, distinct = set(), []
    for variant in variants:
        key = json.dumps(variant, sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            distinct.append(variant)
    return distinct


def _problem(tool: Tool, result: CallToolResult) -> tuple[str, str] | None:
    text = result.content[0].text if result.content else ""
    if result.is_error:
        return ("internal_error", text) if text.startswith("internal_error") else problem_in_error_text(text)
    try:
        tool.result.model_validate(result.structured_content)
    except ValidationError as error:
        return f"a success that is not a {tool.result.__name__}", str(error)
    return None


def _as_openapi(listed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The listed input schemas as an OpenAPI 3.1 document: `POST /<tool>` whose JSON body is the arguments."""
    paths, components = {}, {}
    for name, schema in listed.items():
        components.update({key: _closed(value) for key, value in schema.get("$defs", {}).items()})
        body = _closed({key: value for key, value in schema.items() if key != "$defs"})
        paths[f"/{name}"] = {"post": {"operationId": name, "responses": {"200": {"description": "the result"}},
                                      "requestBody": {"required": True,
                                                      "content": {"application/json": {"schema": body}}}}}
    return {"openapi": "3.1.0", "info": {"title": "weightsmith tools", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}


def _closed(node: Any) -> Any:
    """Refs pointed at the document's components, and `additionalProperties: false` put back on objects
    with properties: the listed schema leaves it out to stay short (every request model refuses unknown
    fields), and without it nearly every generated set would carry one. Unknown fields are still sent,
    by the negative mode and by `hostile.mutate`."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: (value.replace("#/$defs/", "#/components/schemas/") if key == "$ref" else _closed(value))
           for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
