"""The child's progress, one JSON line at a time, in `run_dir/events.jsonl` (see `spec.py`).

    with EventWriter(run_dir) as events:
        events.message("resuming from step 40", step=40)

Each line is written whole and flushed at once, so the service, which tails the file from another
process, reads every event as it happens and never half of one. The file is opened for appending:
a resumed job adds to the events of the runs before it.

A resumed run recomputes the steps after its checkpoint, so the file can hold a step twice (57, 58,
then 51, 52 again). Every metrics event therefore names its run (`run`, one id per process), and
those written while training (or generating) also the step that run started from (`resumed_from`:
its checkpoint's step, or 0). `metric_history` reads them into one value per step.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from training_core.spec import EVENTS_FILE


class EventWriter:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._usage: dict[str, Any] = {"tokens_seen": 0, "flops_used": 0.0, "steps": 0}
        self.run = secrets.token_hex(4)
        """This process's run of the job, stamped on every metrics event."""

    def message(self, message: str, level: str = "info", **data: Any) -> None:
        self._write(level, "message", message, data)

    def metrics(self, data: dict[str, Any], message: str = "") -> None:
        self._write("info", "metrics", message, {**data, "run": self.run})
        if "flops_used" in data:
            self._usage = {"tokens_seen": data["tokens_seen"], "flops_used": data["flops_used"],
                           "steps": data["step"]}

    def usage(self) -> dict[str, Any]:
        """The last reported `tokens_seen`, `flops_used` and step: what a run that failed part-way used,
        as of its last metrics event (the service settles budgets from the same figures)."""
        return dict(self._usage)

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        self._write("info", "checkpoint", f"checkpoint at step {step}", {"step": step, "path": path,
                                                                         "metrics": metrics})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write(self, level: str, kind: str, message: str, data: dict[str, Any]) -> None:
        event = {"time": time.time(), "level": level, "type": kind, "message": message, "data": _finite(data)}
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()


def metric_history(events: Iterable[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` from a job's events in the order they were written: one value per
    step, in step order.

    At the first event of a run that says where it `resumed_from`, the earlier runs' points after
    that step are dropped: that work was lost with them (a run that died before recomputing all of
    it leaves no stale value behind). Of what remains, the newest value of each step wins.
    """
    values: dict[int, float] = {}
    cut_runs: set[Any] = set()
    for event in events:
        data = event.get("data") or {}
        if event.get("type") != "metrics" or data.get(metric) is None:
            continue
        if data.get("resumed_from") is not None and data.get("run") not in cut_runs:
            cut_runs.add(data.get("run"))
            values = {step: value for step, value in values.items() if step <= data["resumed_from"]}
        values[int(data.get("step", 0))] = float(data[metric])
    return sorted(values.items())


def _finite(value: Any) -> Any:
    """NaN and infinity become null: a diverging loss is real, but strict JSON readers reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
