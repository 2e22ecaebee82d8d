"""Models load on first use and leave least recently used first; the engine dies with its parent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx

from tests.conftest import wait_until
from tests.training_core.serving.conftest import ENGINE_ENV, stats
from training_core import presets
from training_core.modelinfo import weight_files
from training_core.serving.client import EngineProcess
from training_core.shapes import PRESETS


def complete(base_url: str, model: Path, adapter: Path | None = None) -> httpx.Response:
    body = {"model": str(model), "prompt": "The quiet window", "max_tokens": 2, "temperature": 0}
    if adapter is not None:
        body["adapter"] = str(adapter)
    return httpx.post(f"{base_url}/completions", json=body, timeout=120)


def loaded(base_url: str) -> set[str]:
    return {entry["id"] for entry in stats(base_url)["loaded"]}


def test_least_recently_used_models_and_adapters_leave_to_make_room(
        tiny_model: Path, lora_adapters: list[Path], tmp_path: Path):
    first, second = (Path(shutil.copytree(tiny_model, tmp_path / name)) for name in ("first", "second"))
    base_bytes = sum(f.stat().st_size for f in weight_files(tiny_model))
    adapter_bytes = (lora_adapters[0] / "adapter_model.safetensors").stat().st_size
    # Room for one base and one adapter (and a half, so rounding never decides), never for two bases.
    budget_mb = (base_bytes + 1.5 * adapter_bytes) / (1 << 20)
    with EngineProcess(memory_mb=budget_mb, env=ENGINE_ENV) as engine:
        url = engine.base_url
        assert url is not None
        assert complete(url, first).status_code == 200
        assert complete(url, second).status_code == 200
        assert loaded(url) == {str(second)}

        assert complete(url, first, lora_adapters[0]).status_code == 200
        assert loaded(url) == {str(first), str(lora_adapters[0])}
        assert complete(url, first, lora_adapters[1]).status_code == 200
        assert loaded(url) == {str(first), str(lora_adapters[1])}
        assert complete(url, first).status_code == 200  # the base alone still serves, its adapter kept

        state = stats(url)
        assert (state["loads"], state["evictions"]) == (5, 3)
        assert state["memory_bytes"] <= state["memory_budget_bytes"]

        # A model larger than the whole budget is refused before anything is evicted for it.
        wider_shape = replace(PRESETS["tiny"], hidden_size=256)
        wider = presets.build_base_model(wider_shape, tiny_model, tmp_path / "wide")
        refused = complete(url, wider)
        assert refused.status_code == 507 and "--memory-mb" in refused.json()["error"]["message"]
        assert loaded(url) == {str(first), str(lora_adapters[1])}


def test_the_engine_exits_when_the_process_that_started_it_dies(tmp_path: Path):
    pid_file = tmp_path / "engine.pid"
    parent_script = (
        "import sys, time\n"
        "from training_core.serving.client import EngineProcess\n"
        "engine = EngineProcess(memory_mb=64)\n"
        "engine.start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(engine._process.pid))\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_script], env={**os.environ, **ENGINE_ENV})
    try:
        engine_pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=180))
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not _alive(engine_pid), timeout=30)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but still listed until reaped: the engine's parent is gone, so init reaps it.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
