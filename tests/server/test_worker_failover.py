"""A worker process killed outright: its lease expires and another worker resumes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from server import auth, jobs
from server.context import open_service
from server.models import JobState
from server.settings import Settings
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tools.datasets import UploadDatasetRequest, upload_dataset
from tools.launch_training import LaunchTrainingRequest, launch_training

ROOT = Path(__file__).resolve().parents[2]


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WEIGHTSMITH_HOME": str(settings.home), "WEIGHTSMITH_LEASE_SECONDS": "3",
           "WEIGHTSMITH_HEARTBEAT_SECONDS": "0.5", "WEIGHTSMITH_WORKER_SLOTS": "1"}
    return subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_sigkilled_worker_loses_its_lease_and_a_second_worker_resumes_the_job(settings: Settings,
                                                                                tmp_path: Path) -> None:
    with open_service(settings, workers=False) as ctx:
        agent, _ = auth.create_agent(ctx.engine, settings, "failover")
        data = write_jsonl(tmp_path / "chat.jsonl", chat_records(64))
        ds = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset.id
        job = launch_training(ctx, agent, LaunchTrainingRequest.model_validate({
            "base_model": str(settings.data_roots[1] / "tiny"), "datasets": [ds], "adapter": "full",
            "hyperparameters": quick_hyperparameters(max_steps=300, save_steps=10)})).job
        assert job is not None
        first = _start_worker(settings)
        second = None
        try:
            wait_until(lambda: jobs.checkpoints(ctx.engine, job.id), timeout=120, interval=0.05)
            owner = jobs.get(ctx.engine, agent.id, job.id).lease_owner
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = _start_worker(settings)
            done = wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, job.id)).state in
                              (JobState.succeeded, JobState.failed) and j, timeout=240)
            assert done.state == JobState.succeeded, done.error
            assert done.attempts == 2 and done.lease_epoch == 2
            messages = [e.message for e in jobs.events(ctx.engine, agent.id, job.id, 0, 2000)]
            assert any(m.startswith("resuming from step") for m in messages), messages
            assert owner is not None and not any(f"by worker {owner} (run 2)" in m for m in messages)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
