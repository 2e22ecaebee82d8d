"""The fuzzers as part of the suite: schemathesis against the REST API and property-based calls of every
MCP tool, on a seeded store, with fixed seeds (reproducible), a bounded number of cases (at least 10,000
together) and no failure allowed. `-s` prints the count; benchmarks/fuzz.py runs the same for longer.

    PYTHONPATH=. python -m pytest -q tests/fuzz -s
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.outcomes import Tally
from tests.fuzz.rest_api import fuzz_rest
from tests.fuzz.store import child_processes
from tests.fuzz.tool_calls import fuzz_tools
from tests.tools.conftest import Seeded

pytestmark = pytest.mark.slow

REST_CASES_PER_OPERATION = 40
"""Generated cases per REST operation, half admitted by its schema; three requests each."""
TOOL_SETS_PER_TOOL = 120
"""Generated argument sets per tool, half admitted by its schema; up to four calls each."""
REST_FLOOR, TOOLS_FLOOR = 2_700, 7_300
"""The fewest requests each run must make (they add up to 10,000); below, the settings above shrank."""


@pytest.fixture(scope="module")
def totals() -> Iterator[list[Tally]]:
    tallies: list[Tally] = []
    yield tallies
    cases, failures = sum(t.cases for t in tallies), sum(t.failure_count for t in tallies)
    print(f"\n[fuzz] {cases} cases, {failures} failures (REST and MCP together)")


def test_every_rest_operation_answers_fuzzed_requests_in_our_form(store: Seeded, totals: list[Tally]) -> None:
    tally = Tally()
    totals.append(tally)
    children = child_processes()
    fuzz_rest(store, tally, REST_CASES_PER_OPERATION, run_seed=0)
    print(f"\n{tally.report()}\n REST, slowest:\n{tally.slowest()}")
    assert child_processes() == children, "a fuzzed request started a process"
    assert tally.cases >= REST_FLOOR
    assert not tally.failures, tally.report()


def test_every_mcp_tool_answers_fuzzed_arguments_in_our_words(store: Seeded, totals: list[Tally]) -> None:
    tally = Tally()
    totals.append(tally)
    children = child_processes()
    fuzz_tools(store, tally, TOOL_SETS_PER_TOOL, run_seed=0)
    print(f"\n{tally.report()}\n MCP, slowest:\n{tally.slowest()}")
    assert child_processes() == children, "a fuzzed call started a process"
    assert tally.cases >= TOOLS_FLOOR
    assert not tally.failures, tally.report()
