"""MCP over stdio and over streamable HTTP (both protocol generations), REST over HTTP, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from server.cli.mcp_client import http_client
from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final
from tools import TOOLS as TOOL_LIST

TOOLS = {tool.name for tool in TOOL_LIST if tool.toolset == "core"}  # what `serve` lists by default




@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_mcp_over_streamable_http_lists_launches_watches_and_cancels(http_service, settings: Settings,
                                                                     tmp_path: Path, mode: str) -> None:
    base, key, _ = http_service
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))

    async def main() -> None:
        async with http_client(f"{base}/mcp", key, mode=mode) as client:
            assert client.protocol_version == {"auto": "2026-07-28", "legacy": "2025-11-25"}[mode]
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            request = {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [ds]}
            done = (await call(client, "launch_training", **request,
                               hyperparameters=quick_hyperparameters()))["job"]
            assert (await wait_final(client, done["id"]))["state"] == "succeeded"
            long = (await call(client, "launch_training", **request,
                               hyperparameters=quick_hyperparameters(max_steps=100000, save_steps=1000)))["job"]
            cancelled = await call(client, "cancel_job", job_id=long["id"])
            assert cancelled["state"] in ("cancelled", "cancelling")
            assert (await wait_final(client, long["id"]))["state"] == "cancelled"
            missing = await client.call_tool("get_job", {"job_id": "job_nope"})
            assert missing.is_error and "not_found" in missing.content[0].text

    anyio.run(main)


def test_mcp_over_http_refuses_a_missing_or_unknown_key(http_service) -> None:
    base, _, _ = http_service
    for headers in ({}, {"Authorization": "Bearer ws_wrong"}):
        response = httpx.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                              headers={**headers, "Accept": "application/json, text/event-stream"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_mcp_over_http_refuses_hosts_outside_the_allow_list(http_service) -> None:
    base, key, _ = http_service
    response = httpx.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                          headers={"Authorization": f"Bearer {key}", "Host": "attacker.example:80",
                                   "Accept": "application/json, text/event-stream"})
    assert response.status_code in (400, 403, 421)


def test_cli_uploads_trains_and_watches_a_job_to_its_end(http_service, settings: Settings, tmp_path: Path) -> None:
    base, key, _ = http_service
    env = {**os.environ, "WEIGHTSMITH_URL": base, "WEIGHTSMITH_API_KEY": key}
    cli = [sys.executable, "-m", "server.cli.main"]
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    uploaded = subprocess.run([*cli, "datasets", "upload", str(data), "--json"], env=env, capture_output=True,
                              text=True, check=True)
    dataset_id = json.loads(uploaded.stdout)["dataset"]["id"]
    trained = subprocess.run([*cli, "train", "--base-model", str(settings.data_roots[1] / "tiny"), "--dataset",
                              dataset_id, "--max-steps", "6", "--watch", "--json"], env=env, capture_output=True,
                             text=True, check=False, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert '"state": "succeeded"' in trained.stdout
    listed = subprocess.run([*cli, "jobs", "list"], env=env, capture_output=True, text=True, check=True)
    assert "succeeded" in listed.stdout


def test_rest_api_runs_the_same_operations_with_json_errors(http_service, settings: Settings, tmp_path: Path) -> None:
    base, key_a, key_b = http_service
    a = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key_a}"}, timeout=70)
    b = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key_b}"}, timeout=70)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    uploaded = a.post("/v1/datasets", json={"path": str(data)}).json()
    assert uploaded["ok"]
    body: dict[str, Any] = {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [uploaded["dataset"]["id"]],
                            "hyperparameters": quick_hyperparameters()}
    launched = a.post("/v1/trainings", json=body).json()
    job_id = launched["job"]["id"]
    job = a.post(f"/v1/jobs/{job_id}/wait", json={"timeout_seconds": 50}).json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        job = a.post(f"/v1/jobs/{job_id}/wait", json={"timeout_seconds": 50}).json()
    assert job["state"] == "succeeded" and job["model_id"]
    assert a.get("/v1/models").json()["models"][0]["id"] == job["model_id"]
    assert a.get(f"/v1/jobs/{job_id}/events").json()["events"]
    assert b.get(f"/v1/jobs/{job_id}").status_code == 404
    bad = a.post("/v1/trainings", json={**body, "hyperparameters": {"learning_rate": -1}})
    assert bad.status_code == 422 and "learning_rate" in bad.text
    assert httpx.get(f"{base}/v1/jobs").status_code == 401
    assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "weightsmith"


def test_mcp_over_stdio_serves_the_local_agent(settings: Settings, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    env = {**os.environ, "WEIGHTSMITH_HOME": str(settings.home), "WEIGHTSMITH_WORKER_SLOTS": "1",
           "WEIGHTSMITH_DATA_ROOTS": f'["{tmp_path}", "{settings.data_roots[1]}"]'}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server.cli.main", "serve", "--stdio"], env=env,
                                   cwd=str(Path(__file__).resolve().parents[3]))

    async def main() -> None:
        async with Client(params) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            job = (await call(client, "launch_training", base_model=str(settings.data_roots[1] / "tiny"),
                              datasets=[ds], hyperparameters=quick_hyperparameters(max_steps=100000)))["job"]
            await call(client, "cancel_job", job_id=job["id"])
            assert (await wait_final(client, job["id"]))["state"] == "cancelled"
            assert (await call(client, "get_quota"))["agent"] == "local"

    anyio.run(main)


def test_cli_adds_an_agent_and_prints_its_key_once(settings: Settings) -> None:
    env = {**os.environ, "WEIGHTSMITH_HOME": str(settings.home)}
    result = subprocess.run([sys.executable, "-m", "server.cli.main", "agents", "add", "cli-agent",
                             "--max-concurrent-jobs", "2"], env=env, capture_output=True, text=True, check=True)
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("ws_")
    engine = make_engine(settings.db_url)
    agent = auth.agent_for_key(engine, key)
    assert agent.name == "cli-agent" and agent.max_concurrent_jobs == 2 and agent.key_hash != key
    again = subprocess.run([sys.executable, "-m", "server.cli.main", "agents", "add", "cli-agent"], env=env,
                           capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "exists" in (again.stdout + again.stderr)
