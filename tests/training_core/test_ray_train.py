"""Data-parallel training on Ray Train workers (`python -m training_core.ray_train`), submitted
through the Ray Jobs API to a real local Ray head: two CPU workers (gloo) train one job as one, and
a run whose driver is killed resumes from its checkpoint like a local job."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.train", reason="ray[train] is not installed; pip install -e '.[ray]'")

from transformers import AutoTokenizer

from server.workers.ray_jobs import RayJobs, SubmissionStatus, training_entrypoint
from tests.conftest import chat_records, wait_until
from tests.events import read_events
from tests.ray_cluster import (
    RayCluster,
    assert_resumed_to_the_end,
    submission_env,
    training_processes,
    write_sft_spec,
)
from training_core.spec import JobResult

pytestmark = pytest.mark.slow  # a Ray Train run starts a driver, a controller and two workers: a minute here


def _submit(ray_jobs: RayJobs, spec_path: Path, attempt: int = 1) -> str:
    args, resources = training_entrypoint(spec_path, devices=2, gpu=False)
    assert args[:2] == ["-m", "training_core.ray_train"]
    job_id = spec_path.parent.parent.name
    return ray_jobs.submit(job_id, attempt, args, submission_env(job_id), resources, cwd=spec_path.parent)


def _ended(ray_jobs: RayJobs, sid: str, timeout: float = 400.0) -> SubmissionStatus:
    return wait_until(lambda: (status := ray_jobs.status(sid)).ended and status, timeout=timeout, interval=0.5)


def test_two_ray_train_workers_train_one_job_on_both_shards_and_count_their_tokens_together(
        ray_cluster: RayCluster, tmp_path: Path, tiny_model: Path) -> None:
    # One epoch exactly (48 records, 2 workers x 4 a step, 6 steps): every record is trained once, on
    # one shard or the other, so the job's tokens are all the records' non-padding tokens.
    spec_path = write_sft_spec(tmp_path / "job-ddp", tiny_model, devices=2, max_steps=6, save_steps=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered: list[Any] = [tokenizer.apply_chat_template(r["messages"], return_dict=True) for r in chat_records(48)]
    expected_tokens = sum(min(64, len(r["input_ids"])) for r in rendered)
    ray_jobs = RayJobs(ray_cluster.dashboard_url)

    sid = _submit(ray_jobs, spec_path)
    status = _ended(ray_jobs, sid)

    assert (status.state, status.exit_code) == ("succeeded", 0), ray_jobs.logs(sid)[-4000:]
    result = JobResult.read(spec_path.parent)
    assert result is not None and result.status == "succeeded", result
    assert result.metrics["devices"] == 2 and result.steps == 6
    assert result.tokens_seen == expected_tokens
    assert result.flops_used == pytest.approx(1000.0 * expected_tokens)
    # Rank 0 speaks for the job; rank 1 keeps its own events apart and writes no result.
    run_dir = spec_path.parent
    assert [e["data"]["step"] for e in read_events(run_dir) if e["type"] == "metrics"] == [1, 2, 3, 4, 5, 6]
    assert any(e["type"] == "metrics" for e in read_events(run_dir / "rank-1"))
    assert not (run_dir / "rank-1" / "result.json").exists()
    assert Path(result.model_dir or "", "model.safetensors").exists()


def test_a_ray_train_job_whose_driver_is_killed_stops_its_workers_and_resumes_from_its_checkpoint(
        ray_cluster: RayCluster, tmp_path: Path, tiny_model: Path) -> None:
    spec_path = write_sft_spec(tmp_path / "job-ddp-kill", tiny_model, devices=2, max_steps=60, save_steps=3)
    run_dir = spec_path.parent
    ray_jobs = RayJobs(ray_cluster.dashboard_url)
    first = _submit(ray_jobs, spec_path, attempt=1)
    wait_until(lambda: any(e["type"] == "checkpoint" for e in read_events(run_dir)), timeout=400, interval=0.5)
    processes = training_processes("job-ddp-kill")
    [driver] = [p for p in processes if "training_core.ray_train" in " ".join(p.cmdline())]
    assert len(processes) == 3  # the driver and two workers

    driver.send_signal(signal.SIGKILL)

    assert _ended(ray_jobs, first, timeout=60).state == "failed"
    wait_until(lambda: not training_processes("job-ddp-kill"), timeout=60)  # the workers die with it
    assert JobResult.read(run_dir) is None
    checkpoints = [e["data"]["step"] for e in read_events(run_dir) if e["type"] == "checkpoint"]

    second = _submit(ray_jobs, spec_path, attempt=2)
    status = _ended(ray_jobs, second)

    assert status.state == "succeeded", ray_jobs.logs(second)[-4000:]
    result = assert_resumed_to_the_end(run_dir, checkpoints, max_steps=60)
    assert result.metrics["devices"] == 2
