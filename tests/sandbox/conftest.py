"""Fixtures for the sandbox tests: each adversarial test runs under every isolation backend.

A backend this machine cannot use is skipped with the reason (`make test` installs bubblewrap
where it can); `test_worker.py` checks that with no backend at all, agent code is refused.
"""

from __future__ import annotations

import pytest

from training_core.sandboxed import isolation_problems


@pytest.fixture(params=["bwrap", "unshare"])
def isolation(request: pytest.FixtureRequest) -> str:
    problem = isolation_problems()[request.param]
    if problem is not None:
        pytest.skip(f"{request.param} cannot isolate on this machine: {problem}")
    return request.param


def process_state(pid: int) -> dict[str, str]:
    """/proc/PID/status as the host sees it: the ground truth, not what the sandbox says of itself."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
