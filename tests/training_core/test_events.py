"""The events file: whole JSON lines, readable by another process as they are written."""

from __future__ import annotations

import json
from pathlib import Path

from training_core.events import EventWriter, metric_history
from training_core.spec import EVENTS_FILE


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text(encoding="utf-8").splitlines()]


def test_each_event_is_readable_the_moment_it_is_written(tmp_path: Path) -> None:
    with EventWriter(tmp_path) as events:
        events.message("resuming from step 40", step=40)
        assert _lines(tmp_path)[-1]["data"] == {"step": 40}  # flushed, not buffered until close
        events.checkpoint(40, str(tmp_path / "checkpoint-40"), {"loss": 1.5})
        assert _lines(tmp_path)[-1]["type"] == "checkpoint"

    first, second = _lines(tmp_path)
    assert first.keys() == {"time", "level", "type", "message", "data"}
    assert (first["level"], first["type"]) == ("info", "message")
    assert second["data"] == {"step": 40, "path": str(tmp_path / "checkpoint-40"), "metrics": {"loss": 1.5}}


def test_a_resumed_run_appends_to_the_events_of_the_run_before(tmp_path: Path) -> None:
    with EventWriter(tmp_path) as events:
        events.message("first run")
    with EventWriter(tmp_path) as events:
        events.message("second run")

    assert [e["message"] for e in _lines(tmp_path)] == ["first run", "second run"]


def test_a_diverged_loss_is_written_as_null_so_strict_json_readers_accept_it(tmp_path: Path) -> None:
    with EventWriter(tmp_path) as events:
        events.metrics({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "tokens_seen": 10,
                        "flops_used": 60.0, "history": [1.0, float("-inf")]})

    line = (tmp_path / EVENTS_FILE).read_text(encoding="utf-8")
    assert "NaN" not in line and "Infinity" not in line
    assert _lines(tmp_path)[0]["data"] == {"step": 3, "loss": None, "grad_norm": None, "tokens_seen": 10,
                                           "flops_used": 60.0, "history": [1.0, None], "run": events.run}


def test_usage_is_what_the_last_metrics_event_reported(tmp_path: Path) -> None:
    with EventWriter(tmp_path) as events:
        assert events.usage() == {"tokens_seen": 0, "flops_used": 0.0, "steps": 0}
        events.metrics({"step": 7, "loss": 2.0, "tokens_seen": 700, "flops_used": 4200.0})
        events.metrics({"step": 7, "eval_loss": 2.1, "tokens_seen": 700, "flops_used": 4200.0})

        assert events.usage() == {"tokens_seen": 700, "flops_used": 4200.0, "steps": 7}


def test_the_metric_history_holds_each_step_once_with_the_value_of_the_run_that_kept_it(tmp_path: Path) -> None:
    def run(steps: range, resumed_from: int, loss: float, evaluate_first: bool = False) -> None:
        with EventWriter(tmp_path) as events:
            if evaluate_first:  # a held-out loss before training, which knows no step to resume from yet
                events.metrics({"step": 0, "eval_loss": 3.0})
            for step in steps:
                events.metrics({"step": step, "resumed_from": resumed_from, "loss": loss})

    run(range(1, 9), 0, 1.0, evaluate_first=True)  # checkpoint at 5, killed after step 8
    run(range(6, 8), 5, 2.0, evaluate_first=True)  # resumed from 5, killed after step 7, before a checkpoint
    run(range(6, 11), 5, 3.0, evaluate_first=True)  # resumed from 5 again, to the end

    events = _lines(tmp_path)
    assert [e["data"]["step"] for e in events if "loss" in e["data"]] == [*range(1, 9), 6, 7, *range(6, 11)]
    assert metric_history(events, "loss") == [*((s, 1.0) for s in range(1, 6)), *((s, 3.0) for s in range(6, 11))]
    assert metric_history(events, "eval_loss") == [(0, 3.0)]
