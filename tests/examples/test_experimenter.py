"""The experimenter agent runs end to end over MCP stdio with a tiny budget and writes its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "agents" / "experimenter.py"


@pytest.mark.slow
def test_experimenter_prices_tunes_trains_the_best_and_writes_what_it_tried_spent_and_found(
        tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "2", "--max-steps", "6", "--final-steps", "8",
         "--pretrain-steps", "20", "--home", str(tmp_path / "home"), "--summary", str(summary)],
        check=False, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=900)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"summary: {summary}" in run.stdout
    assert "dry runs (launch_training dry_run=true):" in run.stdout
    assert "refused" in run.stdout  # the oversized candidate is priced and refused, not started
    text = summary.read_text(encoding="utf-8")
    # What it tried: both trials, each with its parameters and objective.
    assert "| 0 |" in text and "| 1 |" in text
    assert "learning_rate" in text and "lora.r" in text and "eval_loss" in text
    # What it spent: every job's FLOPs, and the study's budget against what it used.
    assert "## What it spent" in text and "Study budget" in text and "FLOPs" in text
    for job in ("pre-training", "study (all trials)", "final run", "eval (model and base)"):
        assert f"| {job} | `job_" in text
    # What it found: the best configuration and the report against the base model.
    assert "Best configuration (trial " in text
    assert "| overlap |" in text and "| ppl |" in text and "verdict **" in text
