"""What a fuzzed call may answer, and the tally of a run: cases per target, time, and each distinct
failure once with the smallest arguments that showed it."""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUR_CODES = ("invalid_request", "invalid_dataset", "not_found", "conflict", "limit_exceeded", "unauthorized")
LIBRARY_TEXT = ("pydantic", "Traceback", "errors.pydantic.dev", "validation error for", "Input should be",
                "Field required", "sqlalchemy", "sqlite3")
"""Text of a library's own errors: an agent is told what to change in our words, never in these."""
REPO = Path(__file__).resolve().parents[2]


def problem_in_error_text(text: str) -> tuple[str, str] | None:
    """Why an error's text is not ours, as (kind, detail), or None when it is."""
    if not text.startswith(tuple(f"{code}:" for code in OUR_CODES)):
        return "error text without one of our codes", text[:300]
    leaked = [marker for marker in LIBRARY_TEXT if marker in text]
    return (f"library text {leaked} in the error", text[:300]) if leaked else None


def problem_in_error_body(status: int, body: Any) -> tuple[str, str] | None:
    """Why a REST 4xx body is not `{"error": {"code", "message", "param"}}` in our words, or None."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"{status} body not in our error form", json.dumps(body)[:300]
    error = body["error"]
    if not {"code", "message", "param"} <= set(error) or error["code"] not in OUR_CODES:
        return f"{status} error without code, message, param or with another code", json.dumps(error)[:300]
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["param"], str | None):
        return f"{status} error message or param of the wrong type", json.dumps(error)[:300]
    return problem_in_error_text(f"{error['code']}: {error['message']}")


@dataclass
class Failure:
    target: str
    problem: str
    arguments: Any
    count: int = 1

    def reproduction(self) -> str:
        return f"{self.target} {_compact(self.arguments)}"


@dataclass
class Tally:
    cases: int = 0
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)
    per_target: dict[str, list[float]] = field(default_factory=dict)
    """target -> [cases, wall seconds, CPU seconds of this process] spent in the calls (not generating)"""
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def case(self, target: str) -> Iterator[None]:
        began, cpu = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.cases += 1
            counted = self.per_target.setdefault(target, [0, 0.0, 0.0])
            counted[0] += 1
            counted[1] += time.monotonic() - began
            counted[2] += time.process_time() - cpu

    def fail(self, target: str, kind: str, detail: str, arguments: Any, cause: BaseException | None = None) -> None:
        """Keeps one failure per (target, kind, where it was raised) with its smallest arguments."""
        if cause is not None:
            kind = f"{kind}: {_raised_at(cause)}"
        known = self.failures.get((target, kind))
        if known is None:
            self.failures[(target, kind)] = Failure(target, f"{kind}: {detail}"[:600], arguments)
        else:
            known.count += 1
            if len(_compact(arguments)) < len(_compact(known.arguments)):
                known.arguments = arguments

    @property
    def failure_count(self) -> int:
        return sum(f.count for f in self.failures.values())

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        return (f"[fuzz] {self.cases} cases, {self.failure_count} failures "
                f"({len(self.failures)} distinct) in {seconds:.0f} s, {self.cases / max(seconds, 1e-9):.0f} cases/s")

    def report(self) -> str:
        lines = [self.line()]
        for failure in self.failures.values():
            lines.append(f"  {failure.count} x {failure.problem}\n      reproduce: {failure.reproduction()}")
        return "\n".join(lines)

    def slowest(self, n: int = 8) -> str:
        """The targets whose calls took longest in all, with each call's wall and CPU time (generating the
        cases is not in these: the run's total less their sum)."""
        ranked = sorted(self.per_target.items(), key=lambda item: -item[1][1])[:n]
        return "\n".join(f"  {target}: {int(c)} calls, {w / max(c, 1) * 1000:.1f} ms wall, "
                         f"{cpu / max(c, 1) * 1000:.1f} ms CPU each; {w:.1f} s in all"
                         for target, (c, w, cpu) in ranked)

    def in_calls(self) -> tuple[float, float]:
        """Wall and CPU seconds spent in the calls themselves."""
        return sum(v[1] for v in self.per_target.values()), sum(v[2] for v in self.per_target.values())


class InternalErrors(logging.Handler):
    """Collects the exceptions the service logs as internal errors (`server/api/errors.py`), so a
    failure names the exception and the line of our code that raised it, not only the status."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.caught: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.caught.append(record.exc_info[1])

    def take(self) -> BaseException | None:
        return self.caught.pop() if self.caught else None

    @contextmanager
    def installed(self) -> Iterator[InternalErrors]:
        logger = logging.getLogger("weightsmith.api")
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False  # the tally reports them, once each
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate


def _raised_at(error: BaseException) -> str:
    """`Type at file:line` of the deepest frame of this repository's code in the traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(str(REPO))
              and "/tests/" not in f.filename]
    where = f" at {Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}: {str(error)[:120]}"


def _compact(value: Any) -> str:
    return json.dumps(value, default=repr, separators=(",", ":"))[:2000]
