"""The closed-loop example, run as its users run it: one command, the service over MCP stdio, the
model served through the OpenAI-compatible endpoint; its last line is the gate's verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Smaller than the script's defaults so the run fits CI, still large enough for the gate to tell.
CI_SIZE = ["--pretrain-steps", "400", "--sft-steps", "600", "--requests", "2", "--next-records", "100",
           "--next-steps", "10"]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 8 minutes on two idle cores; shared CI machines run slower
def test_closed_loop_promotes_a_model_that_beats_its_base_on_tool_calls(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "agents" / "closed_loop.py"),
                          "--home", str(tmp_path / "home"), *CI_SIZE],
                         cwd=ROOT, capture_output=True, text=True, timeout=1150, check=False)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    lines = run.stdout.strip().splitlines()
    final = json.loads(lines[-1])
    assert final["promoted"] is True, run.stdout[-4000:]
    assert final["kpi"] == "tool_call"
    assert final["p_value"] < 0.05
    assert final["candidate"] > final["baseline"] and final["ci95"][0] > 0
    served = [line for line in lines if line.startswith("4. ") and " -> " in line]
    assert served, "no desk request was answered through /openai/v1"
    assert final["next_round"]["verdict"] in ("pass", "fail", "inconclusive")
