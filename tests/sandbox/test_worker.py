"""The sandboxed worker as the training core uses it: many calls, clear errors, reward validation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from training_core.sandboxed import (
    SandboxedFunctions,
    SandboxError,
    SandboxLimits,
    available_isolation,
    reward_scores,
)

REWARDS = '''
import os

calls = 0


def pid(**kwargs):
    global calls
    calls += 1
    return [os.getpid(), calls]


def length_reward(completions, **kwargs):
    return [min(len(c), 10) / 10 for c in completions]


def divide(completions, **kwargs):
    return [1 / len(c) for c in completions]


def hang(**kwargs):
    while True:
        pass


def dict_reward(completions, **kwargs):
    return {"score": 1.0}


def set_reward(completions, **kwargs):
    return {1.0, 2.0}


def short_reward(completions, **kwargs):
    return [1.0]


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


async def async_reward(completions, **kwargs):
    return [1.0 for _ in completions]


def burn(seconds, **kwargs):
    import time
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return True
'''
NAMES = ["pid", "length_reward", "divide", "hang", "dict_reward", "set_reward", "short_reward", "nan_reward",
         "async_reward", "burn"]
needs_isolation = pytest.mark.skipif(not available_isolation(), reason="no isolation backend on this machine; "
                                     "test_without_isolation_agent_code_is_refused covers that case")


@needs_isolation
def test_one_worker_serves_many_calls(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    with SandboxedFunctions(REWARDS, NAMES) as sb:
        ready = time.perf_counter()
        worker = sb.host_pid
        begin = time.perf_counter()
        replies = [sb.call("pid") for _ in range(100)]
        elapsed = time.perf_counter() - begin
        assert sb.host_pid == worker and sb.starts == 1
    assert {pid for pid, _ in replies} == {replies[0][0]}  # one process answered all 100
    assert [count for _, count in replies] == list(range(1, 101))  # and kept its state between calls
    with capsys.disabled():
        print(f"\n[sandbox:{sb.isolation}] start {1000 * (ready - started):.0f} ms, "
              f"{100 / elapsed:.0f} calls/s ({1000 * elapsed / 100:.2f} ms a call)")


@needs_isolation
def test_a_reward_function_gets_trl_keyword_arguments_and_its_scores_are_checked() -> None:
    completions = ["short", "a much longer completion", ""]
    with SandboxedFunctions(REWARDS, NAMES) as sb:
        result = sb.call("length_reward", completions=completions, prompts=["p"] * 3, completion_ids=[[1], [2], [3]])
        assert reward_scores(result, len(completions), "length_reward") == [0.5, 1.0, 0.0]
        assert sb.call("async_reward", completions=completions) == [1.0, 1.0, 1.0]


@needs_isolation
def test_a_function_that_raises_names_the_function_and_the_line() -> None:
    with SandboxedFunctions(REWARDS, NAMES) as sb:
        with pytest.raises(SandboxError) as raised:
            sb.call("divide", completions=["ok", ""])
        assert (raised.value.function, raised.value.kind) == ("divide", "raised")
        assert raised.value.message.startswith("ZeroDivisionError: division by zero")
        assert "line 18" in raised.value.message and "1 / len(c)" in raised.value.message
        assert "'divide'" in str(raised.value)
        assert sb.call("divide", completions=["ab"]) == [0.5]  # the worker goes on
        assert sb.starts == 1


@needs_isolation
def test_a_function_that_hangs_times_out_naming_the_function() -> None:
    with SandboxedFunctions(REWARDS, NAMES, call_timeout=0.5) as sb:
        with pytest.raises(SandboxError) as raised:
            sb.call("hang")
        assert (raised.value.function, raised.value.kind) == ("hang", "timeout")
        assert "0.5 s" in raised.value.message
        assert sb.call("length_reward", completions=["x"]) == [0.1]  # a fresh worker took over
        assert sb.starts == 2


@needs_isolation
def test_a_function_that_returns_the_wrong_shape_is_bad_output() -> None:
    completions = ["a", "b"]
    with SandboxedFunctions(REWARDS, NAMES) as sb:
        with pytest.raises(SandboxError) as raised:
            sb.call("set_reward", completions=completions)
        assert (raised.value.function, raised.value.kind) == ("set_reward", "bad_output")
        assert "set" in raised.value.message and "not JSON" in raised.value.message
        for name, expected in (("dict_reward", "returned a dict"), ("short_reward", "returned a list of 1"),
                               ("nan_reward", "must be finite")):
            with pytest.raises(SandboxError) as raised:
                reward_scores(sb.call(name, completions=completions), len(completions), name)
            assert (raised.value.function, raised.value.kind) == (name, "bad_output")
            assert expected in raised.value.message
        assert "2 numbers, one per completion" in str(
            pytest.raises(SandboxError, reward_scores, {"a": 1}, 2, "dict_reward").value)


def test_reward_scores_accepts_numbers_bools_and_none() -> None:
    assert reward_scores([1, 0.5, True, None], 4, "r") == [1.0, 0.5, 1.0, None]
    for bad, fragment in ((["1.0"], "score 0 is a str"), ([[1.0]], "score 0 is a list"), ([math.inf], "finite"),
                          ([10**400], "finite"), ((1.0,), "a tuple")):
        with pytest.raises(SandboxError) as raised:
            reward_scores(bad, 1, "r")
        assert raised.value.kind == "bad_output" and fragment in raised.value.message


@needs_isolation
def test_code_that_does_not_load_says_why() -> None:
    with pytest.raises(SandboxError) as raised:
        SandboxedFunctions("def reward(:\n    pass\n", ["reward"]).start()
    assert (raised.value.function, raised.value.kind) == (None, "syntax")
    assert raised.value.message.startswith("line 1:")
    with pytest.raises(SandboxError) as raised:
        SandboxedFunctions("def helper(**kwargs):\n    return 1\n", ["reward"]).start()
    assert (raised.value.function, raised.value.kind) == ("reward", "missing")
    assert "defines helper" in raised.value.message
    with pytest.raises(SandboxError) as raised:
        SandboxedFunctions("import numpy_that_does_not_exist\n", ["reward"]).start()
    assert (raised.value.function, raised.value.kind) == (None, "raised")
    assert raised.value.message.startswith("ModuleNotFoundError")
    with SandboxedFunctions(REWARDS, NAMES) as sb, pytest.raises(SandboxError) as raised:
        sb.call("not_loaded")
    assert (raised.value.function, raised.value.kind) == ("not_loaded", "missing")


@needs_isolation
def test_a_worker_is_replaced_before_its_cpu_budget_runs_out() -> None:
    with SandboxedFunctions(REWARDS, NAMES, limits=SandboxLimits(cpu_seconds=1), call_timeout=30) as sb:
        results = [sb.call("burn", seconds=0.3) for _ in range(5)]  # 1.5 s of CPU against a 1 s budget
        assert results == [True] * 5
        assert sb.starts >= 2


@needs_isolation
def test_the_sandbox_dies_with_its_client(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        "import json, sys\n"
        "from training_core.sandboxed import SandboxedFunctions\n"
        "sb = SandboxedFunctions('def f(**k):\\n    return 1\\n', ['f'])\n"
        "sb.start()\n"
        "print(json.dumps(sb.processes()), flush=True)\n"
        "sys.stdin.read()\n", encoding="utf-8")
    client = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert client.stdout is not None
    pids = json.loads(client.stdout.readline())
    assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    client.send_signal(signal.SIGKILL)  # no close(), no cleanup: only the kernel's parent-death signal
    client.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] in "ZX"
        except OSError:
            return True

    wait_until(lambda: all(gone(pid) for pid in pids), timeout=10, interval=0.02)


def test_without_isolation_agent_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor unshare can be found
    assert available_isolation() == ()
    sb = SandboxedFunctions(f"open({str(marker)!r}, 'w').close()\ndef f(**k):\n    return 1\n", ["f"])
    with pytest.raises(SandboxError) as raised:
        sb.start()
    assert raised.value.kind == "unavailable" and raised.value.function is None
    assert "bwrap is not installed" in raised.value.message and "apt-get install bubblewrap" in raised.value.message
    assert not marker.exists() and sb.launcher_pid is None  # nothing ran, not even unconfined


def test_limits_are_checked_and_every_problem_is_named() -> None:
    with pytest.raises(ValueError) as raised:
        SandboxLimits(memory_mb=0, cpu_seconds=2.5)  # type: ignore[arg-type]
    assert "memory_mb=0" in str(raised.value) and "cpu_seconds=2.5" in str(raised.value)
