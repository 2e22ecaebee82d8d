"""The command line as a person uses it, against a live service: human summaries by default, JSON on
request, and one plain line (never a traceback) when the key is missing, wrong or revoked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from server.settings import Settings
from tests.conftest import chat_records, write_jsonl


def weightsmith(*args: str, url: str, key: str | None, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")}
    env.update(WEIGHTSMITH_URL=url, WEIGHTSMITH_HOME=str(home), **({"WEIGHTSMITH_API_KEY": key} if key else {}))
    return subprocess.run([sys.executable, "-m", "server.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_missing_or_unknown_key_is_one_line_naming_what_to_set(http_service, settings: Settings) -> None:
    url, _, _ = http_service
    for key in (None, "ws_not-a-key"):
        done = weightsmith("models", "list", url=url, key=key, home=settings.home)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "WEIGHTSMITH_API_KEY" in done.stderr and "weightsmith agents add" in done.stderr


def test_commands_print_summaries_and_json_on_request(http_service, settings: Settings, tmp_path: Path) -> None:
    url, key, _ = http_service
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    uploaded = weightsmith("datasets", "upload", str(data), url=url, key=key, home=settings.home)
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.startswith("ok  ds_") and "12 records" in uploaded.stdout
    listed = json.loads(weightsmith("datasets", "list", "--json", url=url, key=key, home=settings.home).stdout)
    dataset = listed["datasets"][0]["id"]
    priced = weightsmith("train", "--base-model", str(settings.data_roots[1] / "tiny"), "--dataset", dataset,
                         "--max-steps", "4", "--dry-run", url=url, key=key, home=settings.home)
    assert priced.returncode == 0 and priced.stdout.startswith("dry run: "), priced.stdout + priced.stderr
    refused = weightsmith("train", "--dataset", dataset, "--method", "finetune", url=url, key=key,
                          home=settings.home)
    assert refused.returncode == 1 and "invalid_request" in refused.stderr and "method" in refused.stderr
    models = weightsmith("models", "list", url=url, key=key, home=settings.home).stdout.strip().splitlines()
    assert models[0] == "no models" and models[1].endswith("/openai/v1 (model: an id, name or alias)")


def test_a_revoked_key_is_refused_at_once_over_rest_and_mcp_and_a_rotated_one_works(
        http_service, settings: Settings) -> None:
    url, key_a, _ = http_service
    headers = {"Authorization": f"Bearer {key_a}"}
    assert httpx.get(f"{url}/v1/quota", headers=headers).status_code == 200
    assert weightsmith("agents", "revoke", "http-a", url=url, key=None, home=settings.home).returncode == 0
    assert httpx.get(f"{url}/v1/quota", headers=headers).status_code == 401
    mcp = httpx.post(f"{url}/mcp", headers={**headers, "accept": "application/json, text/event-stream"},
                     json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert mcp.status_code == 401
    assert httpx.get(f"{url}/openai/v1/models", headers=headers).status_code == 401
    rotated = weightsmith("agents", "rotate", "http-a", url=url, key=None, home=settings.home)
    new_key = rotated.stdout.strip().splitlines()[-1]
    assert httpx.get(f"{url}/v1/quota", headers={"Authorization": f"bearer {new_key}"}).status_code == 200
    assert httpx.get(f"{url}/openai/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    assert httpx.get(f"{url}/v1/quota", headers={"Authorization": new_key}).status_code == 401  # no scheme
