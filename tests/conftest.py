"""Shared fixtures: a tiny base model built on the fly, service settings in a temp home, datasets.

Nothing here is mocked: the service runs on a real SQLite file, jobs run as real child processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.context import ServiceContext
from server.service import open_service
from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine, migrate
from tests import ray_cluster as ray_cluster_module
from tests.ray_cluster import RayCluster

ROOT = Path(__file__).resolve().parents[1]

CHAT_FACTS = [
    ("What is a red-drop?", "A red-drop is a customer whose light level is under -27 dBm."),
    ("When is the quiet window?", "The quiet window runs from 01:00 to 04:00."),
    ("Who handles T2 tickets?", "T2 tickets go to the field team for a walk-out."),
    ("What does PARKED mean?", "PARKED means the ticket waits on the customer."),
    ("Where are splice cabinets listed?", "Splice cabinets are listed in the Gridbook by SC code."),
    ("What is an ONT reseat?", "An ONT reseat is unplugging and reseating the customer's optical terminal."),
]


def chat_records(n: int = 48) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (CHAT_FACTS[i % len(CHAT_FACTS)] for i in range(n))]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1M-parameter Llama-style model and a tokenizer trained on the chat facts."""
    from training_core import presets

    target = tmp_path_factory.mktemp("base") / "tiny"
    texts = [f"{q} {a}" for q, a in CHAT_FACTS] * 20
    presets.build_base_model("tiny", texts, target)
    return target


@pytest.fixture
def settings(tmp_path: Path, tiny_model: Path) -> Settings:
    return Settings(home=tmp_path / "home", data_roots=[tmp_path, tiny_model.parent], worker_slots=1,
                    lease_seconds=3.0, heartbeat_seconds=0.5, cancel_grace_seconds=3.0)


@pytest.fixture
def service(settings: Settings) -> Iterator[ServiceContext]:
    with open_service(settings) as ctx:
        yield ctx


def serve_process(settings: Settings, log: Path, **env_settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """`weightsmith serve` as its own process, as an operator runs it; returns it and its base URL.
    `env_settings`: more settings, as the operator's environment gives them (serve_max_tokens="64")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WEIGHTSMITH_HOME": str(settings.home),
           "WEIGHTSMITH_DATA_ROOTS": json.dumps([str(root) for root in settings.data_roots]),
           "WEIGHTSMITH_LEASE_SECONDS": "3", "WEIGHTSMITH_HEARTBEAT_SECONDS": "0.5", "WEIGHTSMITH_WORKER_SLOTS": "1",
           **{f"WEIGHTSMITH_{name.upper()}": value for name, value in env_settings.items()}}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli.main", "serve", "--port", str(port)], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, log.read_text(encoding="utf-8")
        try:
            return httpx.get(f"{base}/docs", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=60, interval=0.2)
    except BaseException:
        proc.kill()
        raise
    return proc, base


def wait_until(predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 0.2) -> Any:
    """Poll with a deadline (never a bare sleep): returns the first truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextmanager
def posted_on_a_raw_socket(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Iterator[None]:
    """POST `body` as JSON to `url` and hold the connection open for the block: closing it at the end
    is the client leaving, at the moment the test chooses (an HTTP client library decides that itself)."""
    target = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection((target.host, target.port)) as sock:
        sock.sendall(f"POST {target.path} HTTP/1.1\r\nHost: {target.host}\r\n{head}Content-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        yield


def quick_hyperparameters(**overrides: Any) -> dict[str, Any]:
    """A few steps on the tiny model: seconds on two CPU cores."""
    return {"max_steps": 8, "per_device_batch_size": 4, "max_seq_length": 64, "learning_rate": 3e-3,
            "save_steps": 4, **overrides}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.pop("WEIGHTSMITH_DATABASE_URL", None)

@pytest.fixture
def http_service(settings: Settings) -> Iterator[tuple[str, str, str]]:
    """A real uvicorn server on a free port; yields (base url, key of agent A, key of agent B)."""
    engine = make_engine(settings.db_url)
    migrate(engine)
    _, key_a = auth.create_agent(engine, settings, "http-a")
    _, key_b = auth.create_agent(engine, settings, "http-b")
    engine.dispose()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key_a, key_b
    server.should_exit = True
    thread.join(30)

@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A local Ray head (127.0.0.1, 2 CPUs, the Jobs API) shared by a module's Ray tests: an idle head's
    dozen processes take a share of the two cores, so it does not outlive the module."""
    available, reason = ray_cluster_module.available_or_reason()
    if not available:
        pytest.skip(reason)
    with ray_cluster_module.ray_head(num_cpus=2) as cluster:
        yield cluster
