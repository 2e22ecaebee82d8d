"""Gated pipelines end to end, through the real MCP client: synth -> train -> eval -> promote moves the
alias only when the gate passes, says why when it does not, survives a restart in the middle without
starting a step twice, and a promotion rolls back in one call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from sqlmodel import Session, select

from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.service import open_service
from server.settings import Settings
from server.store.tables import Job
from tests.conftest import wait_until, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final
from tests.server.evaluation.test_eval import eval_records

SUITE = """
name: {name}
dataset: {dataset}
kpis:
  - {{name: exact, grader: {{type: exact, ignore_case: true}}, threshold: {threshold}}}
decoding: {{max_new_tokens: 8, batch_size: 8}}
"""
TEMPLATES = [{"messages": [{"role": "user", "content": "Where is cabinet {code}?"},
                           {"role": "assistant", "content": "Cabinet {code} is on {street}."}]}]
SLOTS = {"code": [f"SC-{i}" for i in range(12)], "street": ["Mill Lane", "Quay Road", "Hill Street"]}


def pipeline(base: str, suite_id: str) -> dict[str, Any]:
    return {"steps": [
        {"name": "data", "kind": "synth", "request": {
            "task": "instructions", "num_records": 24, "seed": 1,
            "generator": {"type": "template", "templates": TEMPLATES, "slots": SLOTS},
            "filters": {"near_duplicate": None}}},
        {"name": "train", "kind": "train", "request": {
            "base_model": base, "datasets": ["${data.dataset_id}"], "merge_adapter": True,
            "hyperparameters": {"max_steps": 6, "per_device_batch_size": 4, "max_seq_length": 64,
                                "learning_rate": 3e-3, "save_steps": 2}}},
        {"name": "gate", "kind": "eval", "request": {"model": "${train.model_id}", "suite_id": suite_id,
                                                     "baseline": "none"}},
        {"name": "ship", "kind": "promote", "when": 'gate.verdict == "pass"',
         "request": {"alias": "production", "model": "${train.model_id}", "report_id": "${gate.report_id}"}}]}


def _step_jobs(ctx: ServiceContext, run_id: str) -> list[Job]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(Job).where(Job.pipeline_job_id == run_id)))


@pytest.mark.slow
def test_a_gated_pipeline_promotes_on_pass_holds_on_fail_and_rolls_back(settings: Settings, tmp_path: Path) -> None:
    base = str(settings.data_roots[1] / "tiny")
    items = write_jsonl(tmp_path / "items.jsonl", eval_records(12))

    async def setup(client: Client) -> dict[str, str]:
        dataset = (await call(client, "upload_dataset", path=str(items)))["dataset"]["id"]
        ids = {}
        for name, threshold in (("lenient", 0.0), ("strict", 1.01)):
            suite = await call(client, "create_eval_suite", definition=SUITE.format(name=name, dataset=dataset,
                                                                                    threshold=threshold))
            schedule = await call(client, "schedule_run", name=f"nightly-{name}", kind="pipeline",
                                  trigger={"cron": "0 2 * * *", "timezone": "Europe/Berlin"},
                                  request=pipeline(base, suite["id"]))
            ids[name] = schedule["id"]
        return ids

    async def fire(client: Client, schedule_id: str) -> str:
        fired = await call(client, "update_schedule", schedule_id=schedule_id, action="fire")
        assert fired["last_run"]["state"] == "started", fired
        return fired["last_run"]["job_id"]

    with open_service(settings) as ctx:
        async def first() -> tuple[dict[str, str], dict[str, Any], str]:
            async with Client(build_mcp_server(ServiceRef(ctx))) as client:
                ids = await setup(client)
                passed = await wait_final(client, await fire(client, ids["lenient"]))
                strict_run = await fire(client, ids["strict"])
                return ids, passed, strict_run

        ids, passed, strict_run = anyio.run(first)
        assert passed["state"] == "succeeded", passed
        assert passed["metrics"]["promoted"] is True
        # The restart in the middle: stop the service once the strict run's train step runs.
        wait_until(lambda: any(j.pipeline_step == "train" and j.state == "running"
                               for j in _step_jobs(ctx, strict_run)), timeout=300)

    with open_service(settings) as ctx:
        async def second() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
            async with Client(build_mcp_server(ServiceRef(ctx))) as client:
                held = await wait_final(client, strict_run)
                models = await call(client, "list_models")
                with anyio.fail_after(30):  # the scheduler records a run's outcome at its next tick
                    while (detail := await call(client, "list_schedules", schedule_id=ids["strict"])
                           )["recent_runs"][0]["state"] == "started":
                        await anyio.sleep(0.2)
                promoted = models["aliases"]["production"]
                # By hand: the strict run's model to production, then back in one call.
                moved = await call(client, "promote_model", alias="production",
                                   model=json.loads(json.dumps(held["metrics"]))["model_id"])
                back = await call(client, "promote_model", alias="production", rollback=True)
                return held, {"promoted": promoted, **models}, detail, {"moved": moved, "back": back}

        held, models, detail, moves = anyio.run(second)
        steps = _step_jobs(ctx, strict_run)

    assert held["state"] == "succeeded" and held["metrics"]["promoted"] is False
    assert 'gate.verdict == "pass" is false' in held["metrics"]["outcome"], held["metrics"]
    assert sorted(j.pipeline_step for j in steps) == ["data", "gate", "train"]  # none started twice
    assert models["promoted"] == passed["metrics"]["model_id"]  # only the passing run moved it
    assert detail["recent_runs"][0]["state"] == "succeeded"
    assert moves["moved"]["previous_model_id"] == models["promoted"]
    assert moves["back"]["model_id"] == models["promoted"] and moves["back"]["action"] == "rollback"
