"""What the sandbox costs: worker start-up, and per-call overhead at a GRPO step's size.

    python benchmarks/sandbox_overhead.py [STARTS] [CALLS]

For each isolation backend this machine has, prints one JSON line: the median start (launcher,
namespaces, interpreter, load of the code, first reply) and close over STARTS workers, and calls/s
and milliseconds a call over CALLS calls of a regex reward on 64 completions of 200 characters (one
GRPO batch), plus the same for an empty call (pure round trip).

Where the machine has control groups, starts and closes are measured with and without the
worker's group, alternately in one run, and the line adds what the group costs
(`group_start_ms`, `group_close_ms`: the medians' differences, and their ratios).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from training_core import cgroups
from training_core.sandboxed import SandboxedFunctions, available_isolation, reward_scores

CODE = '''
import re

PATTERN = re.compile(r"\\banswer: (\\d+)")


def regex_reward(completions, **kwargs):
    return [1.0 if PATTERN.search(c) else 0.0 for c in completions]


def nothing(**kwargs):
    return None
'''


def main(starts: int, calls: int) -> None:
    completions = [("step by step " * 14) + (f"answer: {i}" if i % 2 else "no idea") for i in range(64)]
    with_groups = cgroups.available().version is not None
    for backend in available_isolation():
        timings: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
        for _ in range(starts):
            for grouped in (True, False) if with_groups else (False,):
                start_ms, close_ms = timings[grouped]
                # Turned off by hand for the comparison: the sandbox itself never runs without a
                # group where the machine has them.
                cgroups.available = _available if grouped else _no_groups  # type: ignore[assignment]
                began = time.perf_counter()
                sb = SandboxedFunctions(CODE, ["regex_reward", "nothing"], isolation=backend)
                sb.start()
                started = time.perf_counter()
                sb.close()
                start_ms.append(1000 * (started - began))
                close_ms.append(1000 * (time.perf_counter() - started))
        cgroups.available = _available  # type: ignore[assignment]
        start_ms, close_ms = timings[with_groups]
        figures: dict[str, object] = {}
        if with_groups:
            plain_start, plain_close = (statistics.median(t) for t in timings[False])
            figures = {"control_group": cgroups.available().version,
                       "group_start_ms": round(statistics.median(start_ms) - plain_start, 1),
                       "group_start_ratio": round(statistics.median(start_ms) / plain_start, 3),
                       "group_close_ms": round(statistics.median(close_ms) - plain_close, 1),
                       "group_close_ratio": round(statistics.median(close_ms) / plain_close, 3)}
        with SandboxedFunctions(CODE, ["regex_reward", "nothing"], isolation=backend) as sb:
            began = time.perf_counter()
            for _ in range(calls):
                sb.call("nothing")
            empty = time.perf_counter() - began
            began = time.perf_counter()
            for _ in range(calls):
                reward_scores(sb.call("regex_reward", completions=completions, prompts=["q"] * 64), 64, "regex_reward")
            batch = time.perf_counter() - began
        print(json.dumps({"isolation": backend, "start_ms_median": round(statistics.median(start_ms), 1),
                          "start_ms_max": round(max(start_ms), 1),
                          "close_ms_median": round(statistics.median(close_ms), 1),
                          **figures,
                          "empty_call_ms": round(1000 * empty / calls, 3), "empty_calls_per_s": round(calls / empty),
                          "batch64_call_ms": round(1000 * batch / calls, 3),
                          "batch64_calls_per_s": round(calls / batch)}))


_available = cgroups.available


def _no_groups() -> cgroups.CgroupSupport:
    return cgroups.CgroupSupport(None, (), "turned off to measure what a group costs")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, int(sys.argv[2]) if len(sys.argv) > 2 else 500)
