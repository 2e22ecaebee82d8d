"""The agent surface as a model meets it: the tool list fits its budget and describes every parameter,
closed sets are enums, and any invalid call answers `invalid_request` naming the field, in our words,
over MCP and REST alike."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from server.api.mcp import build_mcp_server
from server.api.schemas import compact_schema
from server.context import ServiceRef
from tests.tools.conftest import Seeded
from tools import TOOLS

TOOL_LIST_BUDGET_TOKENS = 8000
BOILERPLATE = ("pydantic", "errors.pydantic.dev", "validation error for", "Input should be", "type=")


def _listed(seeded: Seeded, toolsets: tuple[str, ...]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        from mcp import Client

        async with Client(build_mcp_server(ServiceRef(seeded.ctx), toolsets=toolsets)) as client:
            return [t.model_dump(mode="json", exclude_none=True) for t in (await client.list_tools()).tools]

    return anyio.run(main)


def test_the_whole_tool_list_fits_its_budget_and_the_default_list_is_every_core_tool(seeded: Seeded) -> None:
    everything = _listed(seeded, ("all",))
    assert {t["name"] for t in everything} == {t.name for t in TOOLS}
    size = len(json.dumps(everything)) // 4  # what the before-stop hook measures, spaces and all
    assert size < TOOL_LIST_BUDGET_TOKENS, f"the tool list is ~{size} tokens"
    default = _listed(seeded, ("core",))
    print(f"\n[tools] every toolset: {len(everything)} tools, ~{size} tokens; default (core): {len(default)} tools, "
          f"~{len(json.dumps(default)) // 4} tokens")
    assert {t["name"] for t in default} == {t.name for t in TOOLS if t.toolset == "core"}
    for tool in everything:
        assert tool["description"] and tool["annotations"], tool["name"]


def _undescribed(schema: Any, where: str) -> list[str]:
    found = []
    if isinstance(schema, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if not prop.get("description"):
                found.append(f"{where}.{name}")
            found += _undescribed(prop, f"{where}.{name}")
        for key in ("items", "anyOf", "oneOf", "$defs"):
            value = schema.get(key)
            for item in (value.values() if isinstance(value, dict) else value or []):
                found += _undescribed(item, where)
    return found


@pytest.mark.parametrize("tool", TOOLS, ids=[t.name for t in TOOLS])
def test_every_parameter_is_described(tool: Any) -> None:
    schema = compact_schema(tool.request.model_json_schema())
    assert _undescribed(schema, tool.name) == []
    assert "README" not in json.dumps(schema) + tool.description, "the model cannot read the README"


def test_closed_sets_are_enums_and_a_single_value_stands_for_a_list(seeded: Seeded) -> None:
    listed = {t["name"]: t for t in _listed(seeded, ("all",))}
    props = listed["list_jobs"]["input_schema"]["properties"]
    assert "running" in json.dumps(props["state"]) and "enum" in json.dumps(props["kind"])

    async def main() -> None:
        async with seeded.mcp() as client:
            one = await client.call_tool("list_jobs", {"state": "succeeded"})
            assert not one.is_error and all(j["state"] == "succeeded" for j in one.structured_content["jobs"])
            unknown = await client.call_tool("list_jobs", {"state": "done"})
            assert unknown.is_error and "state[0]" in unknown.content[0].text
            assert "succeeded" in unknown.content[0].text  # the allowed values are named

    anyio.run(main)


BAD_CALLS = [
    # (what is wrong, the arguments, the param named)
    ("missing field", {"base_model": "x"}, "datasets"),
    ("wrong type", {"datasets": ["ds_1"], "hyperparameters": {"max_steps": "ten"}}, "hyperparameters.max_steps"),
    ("unknown field", {"datasets": ["ds_1"], "datasetz": ["ds_1"]}, "datasetz"),
    ("bad enum value", {"datasets": ["ds_1"], "method": "finetune"}, "method"),
    ("a boolean for a number", {"datasets": ["ds_1"], "hyperparameters": {"max_steps": True}},
     "hyperparameters.max_steps"),
    ("not a finite number", {"datasets": ["ds_1"], "hyperparameters": {"weight_decay": float("inf")}},
     "hyperparameters.weight_decay"),
]


@pytest.mark.parametrize(("what", "arguments", "param"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_an_invalid_call_answers_invalid_request_naming_the_field_over_mcp_and_rest(
        seeded: Seeded, what: str, arguments: dict[str, Any], param: str) -> None:
    async def over_mcp() -> Any:
        async with seeded.mcp() as client:
            return await client.call_tool("launch_training", arguments)

    result = anyio.run(over_mcp)
    text = result.content[0].text
    assert result.is_error and text.startswith("invalid_request: ") and param in text, text
    assert not any(b in text for b in BOILERPLATE), text
    error = result.structured_content["error"]
    assert error["code"] == "invalid_request" and error["param"] == param

    body = json.dumps(arguments).replace("Infinity", "1e999")  # JSON has no Infinity; 1e999 parses to it
    with seeded.rest() as client:
        response = client.post("/v1/trainings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param, error
    assert not any(b in error["message"] for b in BOILERPLATE), error


def test_every_problem_of_a_call_is_listed_at_once(seeded: Seeded) -> None:
    with seeded.rest() as client:
        response = client.post("/v1/trainings", json={"method": "finetune", "hyperparameters": {"max_steps": 0},
                                                       "colour": "red"})
    error = response.json()["error"]
    assert {p["param"] for p in error["problems"]} == {"method", "datasets", "hyperparameters.max_steps", "colour"}


def test_a_json_nan_is_refused_naming_the_field_not_a_server_error(seeded: Seeded) -> None:
    with seeded.rest() as client:
        for path, body, param in (
                ("/v1/trainings", '{"datasets": ["ds_1"], "hyperparameters": {"learning_rate": NaN}}',
                 "hyperparameters.learning_rate"),
                ("/v1/datasets", '{"filename": "a.jsonl", "content": NaN}', "content")):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["param"] == param


def test_a_number_past_what_the_store_holds_is_refused_naming_the_field(seeded: Seeded) -> None:
    with seeded.rest() as client:
        response = client.get(f"/v1/jobs/{seeded.ids['job']}/events", params={"after_seq": 10**30})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "after_seq"


def test_a_request_whose_parts_cannot_work_together_is_refused_naming_the_field(seeded: Seeded) -> None:
    cases = [({"method": "pretrain", "adapter": "lora", "options": {"preset": "tiny"}}, "adapter"),
             ({"base_model": seeded.ids["tiny"], "adapter": "full", "lora": {"r": 8}}, "lora"),
             ({"base_model": seeded.ids["tiny"], "hyperparameters": {"learning_rate": 1e308}},
              "hyperparameters.learning_rate"),
             ({"base_model": seeded.ids["tiny"], "devices": 64}, "devices")]
    with seeded.rest() as client:
        for fields, param in cases:
            response = client.post("/v1/trainings", json={"datasets": [seeded.ids["dataset"]], **fields})
            assert response.status_code == 422 and response.json()["error"]["param"] == param, response.text


def test_a_resource_of_a_missing_or_foreign_id_is_not_found(seeded: Seeded) -> None:
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    async def main() -> None:
        async with Client(build_mcp_server(ServiceRef(seeded.ctx))) as stranger:  # the local agent, not `seeded`
            for uri in (f"weightsmith://jobs/{seeded.ids['job']}", "weightsmith://jobs/job_missing",
                        "weightsmith://reports/rep_missing"):
                with pytest.raises(MCPError) as refused:
                    await stranger.read_resource(uri)
                assert "not_found" in str(refused.value), refused.value

    anyio.run(main)
