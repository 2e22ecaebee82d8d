"""The README renders as written: every code fence it opens, it closes."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_code_fence_in_the_readme_is_closed() -> None:
    opened = None
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if opened is None:
                opened = number
            else:
                assert line.strip() == "```", f"line {number} opens a fence inside the one opened at line {opened}"
                opened = None
    assert opened is None, f"the fence opened at line {opened} is never closed"
