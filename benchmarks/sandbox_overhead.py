"""What the sandbox costs: worker start-up, and per-call overhead at a GRPO step's size.

    python benchmarks/sandbox_overhead.py [STARTS] [CALLS]

For each isolation backend this machine has, prints one JSON line: the median start (launcher,
namespaces, interpreter, load of the code, first reply) over STARTS workers, and calls/s and
milliseconds a call over CALLS calls of a regex reward on 64 completions of 200 characters (one
GRPO batch), plus the same for an empty call (pure round trip).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

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
    for backend in available_isolation():
        start_ms = []
        for _ in range(starts):
            began = time.perf_counter()
            with SandboxedFunctions(CODE, ["regex_reward", "nothing"], isolation=backend) as sb:
                start_ms.append(1000 * (time.perf_counter() - began))
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
                          "empty_call_ms": round(1000 * empty / calls, 3), "empty_calls_per_s": round(calls / empty),
                          "batch64_call_ms": round(1000 * batch / calls, 3),
                          "batch64_calls_per_s": round(calls / batch)}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, int(sys.argv[2]) if len(sys.argv) > 2 else 500)
