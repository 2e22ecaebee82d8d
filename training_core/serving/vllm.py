"""Serving handed to vLLM on a GPU machine: one `vllm serve` per base model, adapters loaded at run time.

    server = VllmServer("/abs/base", max_loras=8, max_lora_rank=64)
    base_url = server.start()                    # blocks until vLLM answers /health (minutes: it compiles)
    body = server.translate(body)                # {"model": base, "adapter": dir} -> vLLM's own naming
    httpx.post(f"{base_url}/chat/completions", json=body)

UNTESTED here: vLLM is not installed on the machines this was written on (no GPU). It follows vLLM's
documented interface: `vllm serve MODEL --enable-lora --max-loras N --max-lora-rank R`, with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` so that `POST /v1/load_lora_adapter {"lora_name",
"lora_path"}` adds an adapter to the running server; a request then names the adapter as its
`model`. Check it on a GPU machine before relying on it.

What differs from our engine, and what the service's proxy must do about it:
- One vLLM server serves one base model (its adapters included): a second base needs a second server.
- vLLM accepts fields it does not honour; validate bodies with `protocol.ChatCompletionRequest.parse`
  (pydantic only, no torch) before forwarding, so both back ends refuse the same things.
- vLLM keeps at most `max_loras` adapters in a batch and `max_cpu_loras` in memory, evicting on its
  own; after a 404 naming an adapter, `translate(body, reload=True)` loads it again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from training_core.serving.client import EngineStartError


class VllmServer:
    def __init__(self, base_model: str, *, host: str = "127.0.0.1", port: int = 8100, max_loras: int = 8,
                 max_lora_rank: int = 64, gpu_memory_utilization: float = 0.85,
                 log_path: Path | None = None) -> None:
        self.base_model, self.host, self.port = base_model, host, port
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.gpu_memory_utilization = gpu_memory_utilization
        self.log_path = log_path or Path(os.devnull)
        self.base_url = f"http://{host}:{port}/v1"
        self._process: subprocess.Popen[bytes] | None = None
        self._loaded: set[str] = set()

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("vllm")), "serve", self.base_model,
                "--served-model-name", self.base_model, "--host", self.host, "--port", str(self.port),
                "--enable-lora", "--max-loras", str(self.max_loras),
                "--max-lora-rank", str(self.max_lora_rank),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization)]

    def start(self, timeout_s: float = 900.0) -> str:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineStartError(f"vllm serve exited with status {self._process.returncode}; see "
                                       f"{self.log_path}")
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=5).status_code == 200:
                    return self.base_url
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise EngineStartError(f"vllm serve was not ready within {timeout_s:.0f} s; see {self.log_path}")

    def translate(self, body: dict[str, Any], reload: bool = False) -> dict[str, Any]:
        """Our engine's naming (`model` = base directory, `adapter` = adapter directory) in vLLM's."""
        body = dict(body)
        adapter = body.pop("adapter", None)
        if adapter is None:
            return body
        name = "lora-" + hashlib.sha256(adapter.encode()).hexdigest()[:16]
        if reload or name not in self._loaded:
            response = httpx.post(f"{self.base_url}/load_lora_adapter",
                                  json={"lora_name": name, "lora_path": adapter}, timeout=300)
            if response.status_code >= 400 and "already been loaded" not in response.text:
                response.raise_for_status()
            self._loaded.add(name)
        body["model"] = name
        return body

    def stop(self, grace_s: float = 30.0) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._loaded.clear()
