"""The service with the Ray executor, against a real local Ray head: jobs submitted through the Jobs
API run, resume after their Ray job is killed, cancel, train data-parallel with Ray Train, and run
exactly once with two service processes on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from server.service import open_service
from server.settings import Settings
from server.store import agents, jobs
from server.store.tables import Job, JobState, Model, Reservation
from tests import postgres
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tests.ray_cluster import RayCluster
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset

pytestmark = pytest.mark.slow


def _ray(settings: Settings, cluster: RayCluster, **more: object) -> Settings:
    return settings.model_copy(update={"executor": "ray", "ray_address": cluster.dashboard_url, **more})


def _launch(ctx, agent, tmp_path: Path, name: str, **hyper: object) -> str:  # type: ignore[no-untyped-def]
    data = write_jsonl(tmp_path / f"{name}.jsonl", chat_records(32))
    dataset = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset
    assert dataset is not None
    launched = launch_training(ctx, agent, LaunchTrainingRequest.model_validate({
        "base_model": str(ctx.settings.data_roots[1] / "tiny"), "datasets": [dataset.id], "adapter": "full",
        "hyperparameters": quick_hyperparameters(**hyper)}))
    assert launched.job is not None
    return launched.job.id


def _ended(ctx, agent_id: str, job_id: str, timeout: float = 300) -> Job:  # type: ignore[no-untyped-def]
    return wait_until(lambda: (j := jobs.get(ctx.engine, agent_id, job_id)).state in
                      (JobState.succeeded, JobState.failed, JobState.cancelled) and j, timeout=timeout)


def _child_pid(run_dir: Path) -> int | None:
    """The training child of a run, found by its spec path on its command line (Ray started it)."""
    needle = str(run_dir / "spec.json").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_a_job_runs_on_ray_registers_its_model_and_reports_like_a_local_one(
        settings: Settings, ray_cluster: RayCluster, tmp_path: Path) -> None:
    with open_service(_ray(settings, ray_cluster)) as ctx:
        agent = agents.create_agent(ctx.engine, ctx.settings, "ray")[0]
        job_id = _launch(ctx, agent, tmp_path, "ray-job")
        done = _ended(ctx, agent.id, job_id)
        events = [e.message for e in jobs.events(ctx.engine, agent.id, job_id, 0, 500)]
        series, _ = jobs.metric_series(ctx.engine, agent.id, job_id, "loss")
    assert done.state == JobState.succeeded, done.error
    assert done.model_id is not None and done.metrics["tokens_per_second"] > 0
    assert any(m.startswith(f"training process ws-{job_id}-1 started") for m in events), events
    assert [s for s, _ in series] == list(range(1, 9))
    assert "first optimizer step" in events


def test_a_killed_ray_run_resumes_from_its_checkpoint_and_a_cancel_stops_the_ray_job(
        settings: Settings, ray_cluster: RayCluster, tmp_path: Path) -> None:
    with open_service(_ray(settings, ray_cluster)) as ctx:
        agent = agents.create_agent(ctx.engine, ctx.settings, "ray")[0]
        # Killed once its first checkpoint is in the store, with many steps still to go: a step of
        # the tiny model takes tens of milliseconds, so a kill timed by step count could land past
        # any checkpoint the test names.
        job_id = _launch(ctx, agent, tmp_path, "killed", max_steps=200, save_steps=10)
        job = jobs.get(ctx.engine, agent.id, job_id)
        first = wait_until(lambda: jobs.checkpoints(ctx.engine, job_id), timeout=300, interval=0.05)[0]
        pid = _child_pid(Path(job.run_dir))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        done = _ended(ctx, agent.id, job_id)
        messages = [e.message for e in jobs.events(ctx.engine, agent.id, job_id, 0, 2000)]
        resumed = [int(m.split()[-1]) for m in messages if m.startswith("resuming from step")]
        assert done.state == JobState.succeeded, done.error
        assert done.attempts == 2 and resumed and resumed[0] >= first.step, (resumed, first.step, messages[-20:])

        cancelled_id = _launch(ctx, agent, tmp_path, "cancelled", max_steps=400, save_steps=100)
        wait_until(lambda: (jobs.get(ctx.engine, agent.id, cancelled_id).progress.get("step") or 0) >= 2,
                   timeout=300)
        jobs.request_cancel(ctx.engine, agent.id, cancelled_id)
        ctx.wake_workers()
        cancelled = _ended(ctx, agent.id, cancelled_id)
        with Session(ctx.engine) as session:
            reservation = session.exec(select(Reservation).where(Reservation.job_id == cancelled_id)).one()
        assert cancelled.state == JobState.cancelled
        assert reservation.settled_at is not None and reservation.flops_used == cancelled.flops_used
        assert _child_pid(Path(cancelled.run_dir)) is None


def test_two_devices_train_one_job_with_ray_train_and_count_both_shards(
        settings: Settings, ray_cluster: RayCluster, tmp_path: Path) -> None:
    with open_service(_ray(settings, ray_cluster, max_devices=2)) as ctx:
        agent = agents.create_agent(ctx.engine, ctx.settings, "ray")[0]
        data = write_jsonl(tmp_path / "two.jsonl", chat_records(48))
        dataset = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset
        assert dataset is not None
        ended = {}
        for devices in (2, 1):
            launched = launch_training(ctx, agent, LaunchTrainingRequest.model_validate({
                "base_model": str(ctx.settings.data_roots[1] / "tiny"), "datasets": [dataset.id], "adapter": "full",
                "devices": devices, "hyperparameters": quick_hyperparameters(max_steps=4, save_steps=2)}))
            assert launched.job is not None
            ended[devices] = _ended(ctx, agent.id, launched.job.id, timeout=600)
    assert ended[2].state == JobState.succeeded, ended[2].error
    assert ended[2].metrics["devices"] == 2 and ended[1].metrics["devices"] == 1
    # The same steps on two devices train two batches a step: the job counts both shards' tokens.
    assert 1.6 < ended[2].flops_used / ended[1].flops_used < 2.4, (ended[2].flops_used, ended[1].flops_used)


RAY_SERVICE = """
import sys, time
from server.service import open_service
from server.settings import Settings
settings = Settings.model_validate_json(sys.argv[1])
with open_service(settings):
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.timeout(1500)
def test_two_service_processes_on_postgres_with_ray_run_each_of_20_jobs_once(
        settings: Settings, ray_cluster: RayCluster, tmp_path: Path) -> None:
    bin_dir, reason = postgres.available_or_reason()
    if bin_dir is None:
        pytest.skip(reason)
    with postgres.postgres_server(bin_dir) as url:
        shared = _ray(settings, ray_cluster, database_url=url, worker_slots=2)
        with open_service(shared, workers=False, scheduler=False) as ctx:
            agent = agents.create_agent(ctx.engine, shared, "fleet", max_concurrent_jobs=100)[0]
            ids = [_launch(ctx, agent, tmp_path, f"j{i}", max_steps=2, save_steps=2) for i in range(20)]
        services = [subprocess.Popen([sys.executable, "-c", RAY_SERVICE, shared.model_dump_json(), "900"])
                    for _ in range(2)]
        try:
            with open_service(shared, workers=False, scheduler=False) as ctx:
                done = [_ended(ctx, agent.id, job_id, timeout=900) for job_id in ids]
                with Session(ctx.engine) as session:
                    models = session.exec(select(func.count()).select_from(Model)).one()
                    starts = [json.loads(json.dumps(e.data)) for job_id in ids
                              for e in jobs.events(ctx.engine, agent.id, job_id, 0, 500)
                              if e.message.startswith("training process")]
        finally:
            for service in services:
                service.terminate()
                service.wait(60)
    assert all(j.state == JobState.succeeded for j in done), [(j.id, j.error) for j in done]
    assert all(j.attempts == 1 for j in done) and models == 20 and len(starts) == 20
