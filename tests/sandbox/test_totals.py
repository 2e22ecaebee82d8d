"""The sandbox's totals: one control group per worker holds all of its processes together to
`memory_mb`, `max_processes` and `cpu_cores` (see `training_core/cgroups.py`).

Skipped, with the reason, only on a machine that allows no control group at all.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import wait_until
from training_core import cgroups
from training_core.sandboxed import SandboxedFunctions, SandboxError, SandboxLimits

SUPPORT = cgroups.available()
pytestmark = pytest.mark.skipif(SUPPORT.version is None, reason=SUPPORT.reason)

GREEDY = r'''
import os, time


def touch(mb):
    block = bytearray(mb * 2**20)
    for offset in range(0, len(block), 4096):  # a page each: an untouched page costs nothing
        block[offset] = 1
    return block


def five_forks(mb, **kwargs):
    children = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            touch(mb)
            time.sleep(1)  # hold it while the others fill theirs
            os._exit(0)
        children.append(pid)
    return [os.waitpid(pid, 0)[1] for pid in children]


def fork_bomb(**kwargs):
    children = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(10_000)
                os._exit(0)
            children += 1
    except OSError as error:
        return [children, type(error).__name__]


def spin(processes, seconds, **kwargs):
    began = time.monotonic()
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            while time.monotonic() - began < seconds:
                pass
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    times = os.times()
    return [times.children_user + times.children_system, time.monotonic() - began]


def ok(**kwargs):
    return os.getpid()
'''
FUNCTIONS = ["five_forks", "fork_bomb", "spin", "ok"]


def test_five_forks_of_700_mb_under_memory_mb_1024_are_stopped_at_the_total() -> None:
    limits = SandboxLimits(memory_mb=1024)
    with SandboxedFunctions(GREEDY, FUNCTIONS, limits=limits, call_timeout=60, isolation="auto") as sb:
        group = sb.control_group
        assert group is not None and group.memory_bytes == 1024 * 2**20
        with pytest.raises(SandboxError) as raised:
            sb.call("five_forks", mb=700)
        assert (raised.value.function, raised.value.kind) == ("five_forks", "out_of_memory")
        assert "memory_mb=1024" in raised.value.message
        usage = sb.last_usage
        assert usage is not None and usage.oom_kills >= 1
        # The kernel's own count of everything the sandbox held at its peak: never past the total
        # (the same code took 3.85 GB of the host with per-process limits only).
        assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= 1024 * 2**20
        assert not any(directory.exists() for directory in group.directories)
        assert sb.call("ok") == 2 and sb.starts == 2  # a fresh worker, in a fresh group
        assert sb.control_group is not None and sb.control_group.name != group.name


def test_a_fork_bomb_is_stopped_by_the_process_count_of_the_group() -> None:
    limits = SandboxLimits(max_processes=12)
    with SandboxedFunctions(GREEDY, FUNCTIONS, limits=limits, isolation="auto") as sb:
        children, error = sb.call("fork_bomb")
        usage = sb.control_group.usage() if sb.control_group else None
        assert error == "BlockingIOError"
        # The launcher, the namespace's init and the worker count too.
        assert children == limits.max_processes - 3
        assert usage is not None and usage.fork_refusals >= 1 and usage.processes == limits.max_processes
        group = sb.control_group
    assert not any(directory.exists() for directory in group.directories)  # close removed it, children and all


@pytest.mark.skipif("cpu" not in SUPPORT.controllers, reason="no cpu controller here: no CPU quota")
def test_processes_spinning_on_every_core_get_the_cpu_quota_at_most() -> None:
    limits = SandboxLimits(cpu_cores=1)
    with SandboxedFunctions(GREEDY, FUNCTIONS, limits=limits, call_timeout=30, isolation="auto") as sb:
        cpu, wall = sb.call("spin", processes=2, seconds=1.5)
    # An upper bound: a busy machine may give less, never more than one core's worth.
    assert cpu <= limits.cpu_cores * wall * 1.1 + 0.05


def test_a_group_left_by_a_dead_owner_is_removed_with_what_runs_in_it() -> None:
    owner = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        "from training_core import cgroups\n"
        "group = cgroups.create('job', 64 * 2**20, 8)\n"
        "sleeper = subprocess.Popen(group.wrap(['sleep', '300']))\n"
        "print(group.name, sleeper.pid, flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    name, sleeper = owner.stdout.readline().split()  # type: ignore[union-attr]
    owner.kill()  # a crash: nothing removes its group, and the sleeper lives on inside it
    owner.wait()
    left = [parent / name for parent, _ in SUPPORT.parents]
    assert all(directory.exists() for directory in left)
    # The sleeper's shell enters the group a moment after Popen returns, before it execs sleep.
    wait_until(lambda: sleeper in (left[0] / "cgroup.procs").read_text(encoding="utf-8").split(), timeout=10,
               interval=0.01)

    group = cgroups.create("sandbox", 64 * 2**20, 8)
    try:
        assert not any(directory.exists() for directory in left)
        wait_until(lambda: not _running(int(sleeper)), timeout=10, interval=0.02)
    finally:
        group.remove()
    assert not any(directory.exists() for directory in group.directories)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
