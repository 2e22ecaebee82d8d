"""python benchmarks/ray_overhead.py [--rounds 3] [--ray-train]

Time from starting a tiny SFT job to its first optimizer step: as a local child
(`python -m training_core SPEC`, as the local executor starts it) against a submission through the
Ray Jobs API to a local Ray head (`server.workers.ray_jobs`), alternating, in one run. Prints, for
each, the seconds to the child's first event (its process is up and has read the spec) and to its
first optimizer step, and the median difference. The head is started first and is not counted.
`--ray-train` adds one job on two Ray Train workers (`training_core.ray_train`) after the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.workers.ray_jobs import RayJobs, training_entrypoint
from tests.conftest import CHAT_FACTS
from tests.ray_cluster import ray_head, read_events, submission_env, write_sft_spec
from training_core import presets


def _until_first_step(run_dir: Path, began: float, timeout: float = 300.0) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = read_events(run_dir)
        step = next((e for e in events if e["message"] == "first optimizer step"), None)
        if step is not None:
            return events[0]["time"] - began, step["time"] - began
        time.sleep(0.05)
    raise SystemExit(f"no first step in {run_dir} within {timeout} s")


def _local(spec_path: Path) -> tuple[float, float]:
    env = {**os.environ, **submission_env(spec_path.parent.parent.name)}
    began = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "training_core", str(spec_path)], cwd=spec_path.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    figures = _until_first_step(spec_path.parent, began)
    proc.wait(timeout=300)
    return figures


def _ray(ray_jobs: RayJobs, spec_path: Path, devices: int = 1) -> tuple[float, float]:
    job_id = spec_path.parent.parent.name
    args, resources = training_entrypoint(spec_path, devices=devices, gpu=False)
    began = time.time()
    sid = ray_jobs.submit(job_id, 1, args, submission_env(job_id), resources, cwd=spec_path.parent)
    figures = _until_first_step(spec_path.parent, began)
    while not ray_jobs.status(sid).ended:
        time.sleep(0.2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-train", action="store_true", help="also time one job on two Ray Train workers")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-ray-bench-"))
    base = work / "tiny"
    presets.build_base_model("tiny", [f"{q} {a}" for q, a in CHAT_FACTS] * 20, base)
    figures: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    with ray_head(num_cpus=2) as cluster:
        ray_jobs = RayJobs(cluster.dashboard_url)
        for i in range(options.rounds):
            figures["local"].append(_local(write_sft_spec(work / f"local-{i}", base, max_steps=2)))
            figures["ray"].append(_ray(ray_jobs, write_sft_spec(work / f"ray-{i}", base, max_steps=2)))
        if options.ray_train:
            figures["ray_train_2_workers"] = [
                _ray(ray_jobs, write_sft_spec(work / "ray-train", base, devices=2, max_steps=2), devices=2)]
        head_seconds = cluster.start_seconds
    medians = {name: statistics.median(step for _, step in runs) for name, runs in figures.items()}
    # the ray_train figure is one job on two processes: not a like-for-like ratio, so only listed
    print(json.dumps({
        "ray_head_start_seconds": round(head_seconds, 2),
        "seconds_to_first_event": {name: [round(first, 2) for first, _ in runs] for name, runs in figures.items()},
        "seconds_to_first_step": {name: [round(step, 2) for _, step in runs] for name, runs in figures.items()},
        "median_seconds_to_first_step": {name: round(value, 2) for name, value in medians.items()},
        "ray_overhead_seconds": round(medians["ray"] - medians["local"], 2),
        "ray_over_local": round(medians["ray"] / medians["local"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
