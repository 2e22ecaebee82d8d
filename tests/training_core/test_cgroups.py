"""Control groups for training children: a job's group limits its whole tree, holds the sandboxes
its process starts, and takes them with it when removed.

Skipped, with the reason, only on a machine that allows no control group at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from training_core import cgroups

SUPPORT = cgroups.available()
pytestmark = pytest.mark.skipif(SUPPORT.version is None, reason=SUPPORT.reason)

TOUCH = "block = bytearray({mb} * 2**20)\nfor i in range(0, len(block), 4096):\n    block[i] = 1\n"


def test_support_names_what_it_uses_in_one_line() -> None:
    assert SUPPORT.version in ("v1", "v2") and {"memory", "pids"} <= set(SUPPORT.controllers)
    assert "\n" not in SUPPORT.reason and SUPPORT.version in SUPPORT.reason


def test_a_job_whose_children_pass_its_memory_together_is_killed_and_says_so() -> None:
    group = cgroups.create("job", memory_bytes=200 * 2**20, max_processes=16)
    # Two processes of 120 MB each: either alone fits, both together do not.
    script = f"import os\nif os.fork() == 0:\n    pass\n{TOUCH.format(mb=120)}import time\ntime.sleep(2)\n"
    try:
        subprocess.run(group.wrap([sys.executable, "-c", script]), timeout=60, check=False)
        usage = group.usage()
    finally:
        last = group.remove()
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= 200 * 2**20
    assert last is not None and last.oom_kills == usage.oom_kills
    assert not any(directory.exists() for directory in group.directories)


def test_removing_a_job_group_removes_the_sandbox_groups_its_process_made(tmp_path: Path) -> None:
    job = cgroups.create("job", memory_bytes=512 * 2**20, max_processes=32)
    report = tmp_path / "inner.txt"
    child = subprocess.Popen(job.wrap([sys.executable, "-c", (
        "import subprocess, sys\n"
        "from training_core import cgroups\n"
        "inner = cgroups.create('sandbox', 64 * 2**20, 8)\n"
        "sleeper = subprocess.Popen(inner.wrap(['sleep', '300']))\n"
        f"open({str(report)!r}, 'w').write(' '.join([str(sleeper.pid), *map(str, inner.directories)]))\n"
        "sys.stdin.read()\n")]), stdin=subprocess.PIPE)
    try:
        wait_until(report.exists, timeout=30, interval=0.05)
        sleeper, *inner = wait_until(lambda: report.read_text(encoding="utf-8").split(), timeout=10, interval=0.05)
        # The sandbox's group is made inside the job's, so the job's limits bound it too.
        assert all(Path(directory).parent in job.directories for directory in inner)
        wait_until(lambda: sleeper in Path(inner[0], "cgroup.procs").read_text(encoding="utf-8").split(),
                   timeout=10, interval=0.01)
    finally:
        job.remove()
        child.wait(timeout=10)
    assert not any(Path(directory).exists() for directory in [*inner, *map(str, job.directories)])
    assert child.returncode == -9  # killed with its group
