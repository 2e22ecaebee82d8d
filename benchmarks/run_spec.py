"""Run one training method directly (`python -m training_core SPEC.json`) and return its result.

The benchmarks compare training configurations, not the service: each run is a fresh process, so
its peak memory is its own, started exactly the way a worker starts a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_core.spec import Hyperparameters, JobResult, JobSpec

SAMPLE = ROOT / "examples" / "sample_corpus"


def run_method(work: Path, method: str, base_model: str, train_files: list[str], hyperparameters: dict[str, Any],
               adapter: str = "full", options: dict[str, Any] | None = None, devices: int = 1) -> JobResult:
    work.mkdir(parents=True, exist_ok=True)
    hyper = Hyperparameters(**{"gradient_accumulation_steps": 1, "eval_fraction": 0.0, "save_steps": 10**6,
                               **hyperparameters})
    spec = JobSpec(job_id=work.name, method=method, run_dir=str(work), output_dir=str(work / "output"),
                   base_model=base_model, train_files=train_files, hyperparameters=hyper, adapter=adapter,
                   options=options or {}, devices=devices)
    spec.write(work / "spec.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "training_core", str(work / "spec.json")], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = JobResult.read(work)
    if result is None or result.status != "succeeded":
        raise SystemExit(f"{method} run in {work} did not succeed: {result and result.error}; "
                         f"see {work / 'events.jsonl'}")
    return result


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2))
