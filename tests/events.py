"""The events a child has written so far, for tests that watch a run while it trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training_core.spec import EVENTS_FILE


def read_events(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every whole line of `run_dir`'s events file; none when it is not there yet. A line the child
    is still writing is left out: read mid-write, it is cut-off JSON."""
    try:
        text = (Path(run_dir) / EVENTS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
