"""The fuzzers of tests/fuzz for longer: rounds of schemathesis against the REST API and property-based
calls of every MCP tool, a new seed each round, until the time is up. Prints the case count, each distinct
failure with a reproduction (the route or tool and the smallest arguments that showed it), and cases/s;
exits 1 if anything failed.

    python benchmarks/fuzz.py --minutes 10 --seed 1 [--only rest|mcp]

Seeding the store trains a tiny model first (about a minute on two cores), as the tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# The fuzzers live in the test tree (tests/fuzz), which is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import CHAT_FACTS
from tests.fuzz.outcomes import Tally
from tests.fuzz.rest_api import fuzz_rest
from tests.fuzz.store import fuzz_store
from tests.fuzz.tool_calls import fuzz_tools
from training_core import presets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="Fuzz this long (after seeding the store).")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the first round; each round adds one.")
    parser.add_argument("--only", choices=("rest", "mcp"), help="Fuzz one transport only.")
    parser.add_argument("--per-round", type=int, default=8,
                        help="Generated cases per REST operation and argument sets per tool in one round.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="weightsmith-fuzz-") as tmp:
        root = Path(tmp)
        tiny = root / "base" / "tiny"
        presets.build_base_model("tiny", [f"{q} {a}" for q, a in CHAT_FACTS] * 20, tiny)
        with fuzz_store(root / "store", tiny) as store:
            tally = Tally()
            deadline = time.monotonic() + args.minutes * 60
            run_seed = args.seed
            while time.monotonic() < deadline:
                if args.only != "mcp":
                    fuzz_rest(store, tally, args.per_round, run_seed=run_seed, deadline=deadline)
                if args.only != "rest":
                    fuzz_tools(store, tally, args.per_round, run_seed=run_seed, deadline=deadline)
                print(f"{tally.line()} (seeds {args.seed}..{run_seed})", flush=True)
                run_seed += 1
    print(tally.report())
    print(f"slowest targets:\n{tally.slowest(12)}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
