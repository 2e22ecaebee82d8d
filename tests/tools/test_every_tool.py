"""Every registered tool, called over MCP (the real client, in memory) and over REST on a store seeded
with real objects: both answer, the answers are the tool's result, and a default result is small."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from tests.tools.conftest import Seeded, chat_jsonl
from tools import BY_NAME, TOOLS, Tool

RESULT_BUDGET_TOKENS = 2000
"""A default result, as compact JSON, in characters / 4."""

TEMPLATE_GENERATOR = {"type": "template", "templates": [{"prompt": "What is {x}?", "completion": "{x} is a code."}],
                      "slots": {"x": ["SC-1", "SC-2", "SC-3", "SC-4"]}}
EXAMPLES: dict[str, dict[str, Any]] = {
    "upload_dataset": {"filename": "more.jsonl", "content": chat_jsonl(6)},
    "validate_dataset": {"dataset_id": "{dataset}"},
    "list_datasets": {},
    "launch_training": {"base_model": "{tiny}", "datasets": ["{dataset}"], "hyperparameters": {"max_steps": 4},
                        "dry_run": True},
    "get_job": {"job_id": "{job}"},
    "wait_for_job": {"job_id": "{job}", "timeout_seconds": 1},
    "list_jobs": {},
    "cancel_job": {"job_id": "{cancelled}"},
    "get_job_events": {"job_id": "{job}"},
    "get_metric_history": {"job_id": "{job}"},
    "list_models": {},
    "get_model": {"model": "{model}"},
    "sample_model": {"model": "{model}", "prompts": ["What is SC-1?", "And SC-2?"], "max_tokens": 4},
    "get_quota": {},
    "generate_synthetic_data": {"task": "instructions", "generator": TEMPLATE_GENERATOR, "num_records": 4,
                                "dry_run": True},
    "tune_hyperparameters": {"template": {"base_model": "{tiny}", "datasets": ["{dataset}"],
                                          "hyperparameters": {"max_steps": 2, "max_seq_length": 64}},
                             "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                "log": True}},
                             "n_trials": 1, "idempotency_key": "every-tool-study"},
    "create_eval_suite": {"definition": "{suite_definition}"},
    "list_eval_suites": {},
    "run_eval": {"model": "{model}", "suite_id": "{suite}", "dry_run": True},
    "read_eval_report": {"ref": "{eval_job}"},
    "check_drift": {"against": "{model}", "dataset_id": "{dataset}"},
    "schedule_run": {"trigger": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}, "kind": "eval",
                     "request": {"model": "{model}", "suite_id": "{suite}"}, "dry_run": True},
    "list_schedules": {"schedule_id": "{schedule}"},
    "update_schedule": {"schedule_id": "{schedule}", "action": "pause"},
    "promote_model": {"alias": "staging", "model": "{model}", "report_id": "{report}"},
}


def test_every_tool_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(BY_NAME), "a new tool needs its example call in this table"


def _filled(value: Any, seeded: Seeded) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in _ids(seeded):
        return _ids(seeded)[value[1:-1]]
    if isinstance(value, dict):
        return {k: _filled(v, seeded) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, seeded) for v in value]
    return value


def _ids(seeded: Seeded) -> dict[str, str]:
    from tests.tools.conftest import SUITE

    return {**seeded.ids, "suite_definition": SUITE.format(dataset=seeded.ids["items"])}


@pytest.mark.parametrize("tool", TOOLS, ids=[t.name for t in TOOLS])
def test_a_tool_answers_over_mcp_and_rest_with_its_result_in_budget(tool: Tool, seeded: Seeded) -> None:
    arguments = _filled(EXAMPLES[tool.name], seeded)

    async def over_mcp() -> tuple[dict[str, Any], str]:
        async with seeded.mcp() as client:
            result = await client.call_tool(tool.name, arguments)
            assert not result.is_error, result.content[0].text
            return result.structured_content, result.content[0].text

    structured, text = anyio.run(over_mcp)
    tool.result.model_validate(structured)
    assert json.loads(text) == json.loads(tool.result.model_validate(structured).compact_json())
    print(f"\n[result] {tool.name}: ~{len(text) // 4} tokens")  # `-s` shows each tool's size
    assert len(text) / 4 < RESULT_BUDGET_TOKENS, f"{tool.name}: default result ~{len(text) // 4} tokens"

    path, rest = tool.route.path, dict(arguments)
    for name in tool.path_fields():
        path = path.replace(f"{{{name}}}", str(rest.pop(name)))
    with seeded.rest() as client:
        response = client.request(tool.route.method, f"/v1{path}", **(
            {"params": rest} if tool.takes_query() else {"json": rest}))
    assert response.status_code == 200, response.text
    over_rest = tool.result.model_validate(response.json())
    assert set(over_rest.model_dump()) == set(tool.result.model_validate(structured).model_dump())
