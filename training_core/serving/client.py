"""The engine process seen from the service: start it, know its URL, stop it. Imports no torch.

    engine = EngineProcess(memory_mb=2048, log_path=home / "engine.log")
    base_url = engine.start()          # blocks until ready (seconds: torch and transformers import)
    httpx.post(f"{base_url}/chat/completions", json={"model": "/abs/model", "messages": [...]})
    engine.stop()

`start` blocks; in async code call it through `asyncio.to_thread` (the service's lifespan starts the
engine lazily, on the first request that needs it). The engine exits by itself if this process
dies, and `stop` sends SIGTERM, then SIGKILL after `grace_s`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx


class EngineStartError(RuntimeError):
    """The engine exited, or was not ready in time; the message ends with its log's last lines."""


class EngineProcess:
    def __init__(self, memory_mb: float, *, host: str = "127.0.0.1", port: int = 0,
                 log_path: Path | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.memory_mb, self.host, self.port = memory_mb, host, port
        self.extra_args, self.env = extra_args or [], env
        self._scratch = tempfile.TemporaryDirectory(prefix="weightsmith-engine-")
        self.log_path = log_path or Path(self._scratch.name) / "engine.log"
        self._ready_file = Path(self._scratch.name) / "ready.json"
        self._process: subprocess.Popen[bytes] | None = None
        self.base_url: str | None = None
        """`http://HOST:PORT/v1` once started."""

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the engine and wait until it answers; returns its base URL (`.../v1`)."""
        if self._process is not None and self._process.poll() is None and self.base_url is not None:
            return self.base_url
        self._ready_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "training_core.serving", "--host", self.host, "--port",
                   str(self.port), "--memory-mb", str(self.memory_mb), "--ready-file", str(self._ready_file),
                   *self.extra_args]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout_s
        while not self._ready_file.exists():
            if self._process.poll() is not None:
                raise EngineStartError(f"the engine exited with status {self._process.returncode} before it "
                                       f"was ready:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(f"the engine was not ready within {timeout_s:.0f} s:\n"
                                       f"{self._log_tail()}")
            time.sleep(0.05)
        self.base_url = json.loads(self._ready_file.read_text(encoding="utf-8"))["url"]
        httpx.get(f"{self.base_url.removesuffix('/v1')}/health", timeout=10).raise_for_status()
        return self.base_url

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process, self.base_url = None, None

    def close(self) -> None:
        self.stop()
        self._scratch.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
