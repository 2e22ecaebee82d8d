"""The Ray Jobs API wrapper against a real local Ray head: a submission runs `python -m training_core
SPEC` and talks back through its run directory, as a local child does; stop ends it; a run killed
mid-way leaves no result, and the next submission resumes from its checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission", reason="ray[default] is not installed; pip install -e '.[ray]'")

from server.workers.ray_jobs import LogTail, RayJobs, RayJobsError, SubmissionStatus, training_entrypoint
from tests.conftest import wait_until
from tests.events import read_events
from tests.ray_cluster import (
    RayCluster,
    assert_resumed_to_the_end,
    submission_env,
    training_processes,
    write_sft_spec,
)
from training_core.spec import JobResult


def _submit(ray_jobs: RayJobs, spec_path: Path, attempt: int = 1) -> str:
    args, resources = training_entrypoint(spec_path, devices=1, gpu=False)
    job_id = spec_path.parent.parent.name
    return ray_jobs.submit(job_id, attempt, args, submission_env(job_id), resources, cwd=spec_path.parent)


def _ended(ray_jobs: RayJobs, sid: str, timeout: float = 240.0) -> SubmissionStatus:
    return wait_until(lambda: (status := ray_jobs.status(sid)).ended and status, timeout=timeout, interval=0.5)


def _event(run_dir: Path, message: str, timeout: float = 240.0) -> dict:
    return wait_until(lambda: next((e for e in read_events(run_dir) if e["message"].startswith(message)), None),
                      timeout=timeout, interval=0.5)


def test_a_tiny_sft_job_through_the_jobs_api_leaves_its_result_and_events(
        ray_cluster: RayCluster, tmp_path: Path, tiny_model: Path) -> None:
    ray_jobs = RayJobs(ray_cluster.dashboard_url)
    spec_path = write_sft_spec(tmp_path / "job-ok", tiny_model, max_steps=6, save_steps=3)

    sid = _submit(ray_jobs, spec_path)
    assert sid == "ws-job-ok-1"
    assert _submit(ray_jobs, spec_path) == sid  # a retried submit of the same run starts nothing more
    status = _ended(ray_jobs, sid)

    assert (status.state, status.exit_code) == ("succeeded", 0), ray_jobs.logs(sid)[-3000:]
    assert [s.submission_id for s in ray_jobs.submissions("job-ok")] == [sid]
    result = JobResult.read(spec_path.parent)
    assert result is not None and result.status == "succeeded", result
    assert result.steps == 6 and result.tokens_seen > 0
    assert result.flops_used == pytest.approx(1000.0 * result.tokens_seen)
    assert Path(result.model_dir or "", "model.safetensors").exists()
    events = read_events(spec_path.parent)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e["data"]["step"] for e in events if e["type"] == "checkpoint"] == [3, 6]
    assert any(e["message"] == "first optimizer step" for e in events)
    # The child's output, as Ray keeps it, comes back in whole lines, each once.
    logs = LogTail(ray_jobs, sid)
    lines = logs.read()
    assert any(line.startswith(f"Running entrypoint for job {sid}") for line in lines), lines
    assert logs.read() == []


def test_stop_ends_a_running_ray_job_and_its_process(ray_cluster: RayCluster, tmp_path: Path,
                                                     tiny_model: Path) -> None:
    ray_jobs = RayJobs(ray_cluster.dashboard_url)
    spec_path = write_sft_spec(tmp_path / "job-stop", tiny_model, max_steps=100_000)
    sid = _submit(ray_jobs, spec_path)
    _event(spec_path.parent, "first optimizer step")
    [child] = training_processes("job-stop")
    assert "training_core" in child.cmdline()

    assert ray_jobs.stop(sid)

    assert _ended(ray_jobs, sid, timeout=60).state == "stopped"
    wait_until(lambda: not training_processes("job-stop"), timeout=30)
    assert not child.is_running() or child.status() == "zombie"
    assert JobResult.read(spec_path.parent) is None
    assert not ray_jobs.stop(sid)  # stopping a run that has ended is no error


@pytest.mark.slow
def test_a_killed_run_leaves_no_result_and_the_next_submission_resumes_from_its_checkpoint(
        ray_cluster: RayCluster, tmp_path: Path, tiny_model: Path) -> None:
    ray_jobs = RayJobs(ray_cluster.dashboard_url)
    spec_path = write_sft_spec(tmp_path / "job-kill", tiny_model, max_steps=60, save_steps=5)
    run_dir = spec_path.parent
    first = _submit(ray_jobs, spec_path, attempt=1)
    _event(run_dir, "checkpoint at step")
    [child] = training_processes("job-kill")
    child.send_signal(signal.SIGKILL)

    died = _ended(ray_jobs, first, timeout=60)
    assert died.state == "failed" and died.exit_code != 0, died
    assert JobResult.read(run_dir) is None  # died: the service resumes the job rather than settle it
    checkpoints = [e["data"]["step"] for e in read_events(run_dir) if e["type"] == "checkpoint"]

    second = _submit(ray_jobs, spec_path, attempt=2)
    status = _ended(ray_jobs, second)

    assert second == "ws-job-kill-2" and status.state == "succeeded", ray_jobs.logs(second)[-3000:]
    assert [s.state for s in ray_jobs.submissions("job-kill")] == ["failed", "succeeded"]
    assert_resumed_to_the_end(run_dir, checkpoints, max_steps=60)


def test_an_address_without_a_jobs_api_is_refused_naming_it() -> None:
    with pytest.raises(RayJobsError, match=r"http://127\.0\.0\.1:9.*dashboard address"):
        RayJobs("http://127.0.0.1:9")
