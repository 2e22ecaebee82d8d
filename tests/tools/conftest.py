"""A store seeded with real objects, made once for the tool tests (and the fuzz tests): datasets, a finished
train job and its model, a cancelled job, an eval suite with a report, a schedule. Every tool can be called
on it for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from mcp import Client

from server.api.app import rest_app
from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.service import open_service
from server.settings import Settings
from server.store import agents
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl
from tests.server.evaluation.test_eval import eval_records

SUITE = """
name: facts
dataset: {dataset}
kpis:
  - {{name: exact, grader: {{type: exact, ignore_case: true}}}}
  - {{name: rouge, grader: {{type: similarity, metric: rouge_l}}}}
decoding: {{max_new_tokens: 8, batch_size: 8}}
"""


@dataclass
class Seeded:
    ctx: ServiceContext
    key: str
    ids: dict[str, str]

    def mcp(self) -> Client:
        return Client(build_mcp_server(ServiceRef(self.ctx), local_key=self.key, toolsets=("all",)))

    def rest(self) -> TestClient:
        return TestClient(rest_app(ServiceRef(self.ctx)), headers={"Authorization": f"Bearer {self.key}"})


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def finished(client: Client, job_id: str) -> dict[str, Any]:
    with anyio.fail_after(300):
        while True:
            job = await call(client, "wait_for_job", job_id=job_id, timeout_seconds=20)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("seeded")
    settings = seed_settings(root, tiny_model)
    with open_service(settings) as ctx:
        _, key = agents.create_agent(ctx.engine, settings, "seeded")
        seeded = Seeded(ctx, key, {"tiny": str(tiny_model)})
        anyio.run(seed_objects, seeded, root)
        yield seeded


def seed_settings(root: Path, tiny_model: Path) -> Settings:
    return Settings(home=root / "home", data_roots=[root, tiny_model.parent], worker_slots=1,
                    lease_seconds=3.0, heartbeat_seconds=0.5, cancel_grace_seconds=3.0)


async def seed_objects(seeded: Seeded, root: Path) -> None:
    """Through the real tools, as `seeded`'s agent, on a service whose workers run: fills `seeded.ids`."""
    chats = write_jsonl(root / "chat.jsonl", chat_records(48))
    items = write_jsonl(root / "items.jsonl", eval_records(16))
    async with seeded.mcp() as client:
        ids = seeded.ids
        ids["dataset"] = (await call(client, "upload_dataset", path=str(chats)))["dataset"]["id"]
        ids["items"] = (await call(client, "upload_dataset", path=str(items)))["dataset"]["id"]
        launched = await call(client, "launch_training", base_model=ids["tiny"], datasets=[ids["dataset"]],
                              merge_adapter=True, hyperparameters=quick_hyperparameters())
        job = await finished(client, launched["job"]["id"])
        assert job["state"] == "succeeded", job["error"]
        ids["job"], ids["model"] = job["id"], job["model_id"]
        queued = await call(client, "launch_training", base_model=ids["tiny"], datasets=[ids["dataset"]],
                            hyperparameters=quick_hyperparameters(max_steps=50))
        ids["cancelled"] = (await call(client, "cancel_job", job_id=queued["job"]["id"]))["id"]
        suite = await call(client, "create_eval_suite", definition=SUITE.format(dataset=ids["items"]))
        ids["suite"] = suite["id"]
        started = await call(client, "run_eval", model=ids["model"], suite_id=ids["suite"])
        evaluated = await finished(client, started["job"]["id"])
        assert evaluated["state"] == "succeeded", evaluated["error"]
        ids["eval_job"] = evaluated["id"]
        ids["report"] = (await call(client, "read_eval_report", ref=evaluated["id"]))["id"]
        ids["schedule"] = (await call(client, "schedule_run", name="nightly-eval", kind="eval",
                                      trigger={"cron": "0 3 * * *", "timezone": "UTC"},
                                      request={"model": ids["model"], "suite_id": ids["suite"]}))["id"]


def chat_jsonl(n: int) -> str:
    return "".join(json.dumps(r) + "\n" for r in chat_records(n))
