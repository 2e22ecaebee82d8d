"""Jobs under stress: a killed process resumes from its checkpoint, caps stop a job, cancel."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlmodel import Session, select

from server.context import ServiceContext
from server.store import agents as auth
from server.store import jobs, reservations
from server.store.tables import Checkpoint, JobState, Reservation
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset


def _launch(service: ServiceContext, tmp_path: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    agent, _ = auth.create_agent(service.engine, service.settings, name)
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(64))
    ds = upload_dataset(service, agent, UploadDatasetRequest(path=str(path))).dataset.id
    request = LaunchTrainingRequest.model_validate({
        "base_model": str(service.settings.data_roots[1] / "tiny"), "datasets": [ds], "adapter": "full",
        **overrides})
    job = launch_training(service, agent, request).job
    assert job is not None
    return agent, job.id


def _child_pid(service: ServiceContext, agent_id: str, job_id: str, after: int = 0) -> int:
    def started() -> int | None:
        for event in jobs.events(service.engine, agent_id, job_id, after, 500):
            if event.message.startswith("training process") and event.seq > after:
                return int(event.data["process"])  # a local child is named by its pid
        return None

    return wait_until(started, timeout=60, interval=0.05)


def _final(service: ServiceContext, agent_id: str, job_id: str, timeout: float = 240):  # type: ignore[no-untyped-def]
    return wait_until(lambda: (j := jobs.get(service.engine, agent_id, job_id)).state in
                      (JobState.succeeded, JobState.failed, JobState.cancelled) and j, timeout=timeout)


def _reservation(service: ServiceContext, job_id: str) -> Reservation:
    with Session(service.engine) as session:
        return session.exec(select(Reservation).where(Reservation.job_id == job_id)).one()


def test_sigkilled_training_process_resumes_from_its_checkpoint_and_settles_once(
        service: ServiceContext, tmp_path: Path) -> None:
    agent, job_id = _launch(service, tmp_path, "resumer",
                            hyperparameters=quick_hyperparameters(max_steps=300, save_steps=10))
    pid = _child_pid(service, agent.id, job_id)

    def checkpointed() -> list[Checkpoint]:
        return jobs.checkpoints(service.engine, job_id)

    first = wait_until(checkpointed, timeout=120, interval=0.05)[0]
    os.kill(pid, signal.SIGKILL)
    job = _final(service, agent.id, job_id)
    assert job.state == JobState.succeeded, job.error
    assert job.attempts == 2
    messages = [e.message for e in jobs.events(service.engine, agent.id, job_id, 0, 2000)]
    assert any("no result" in m for m in messages), messages
    resumed = [m for m in messages if m.startswith("resuming from step")]
    assert resumed and int(resumed[0].split()[-1]) >= first.step, messages
    reservation = _reservation(service, job_id)
    assert reservation.settled_at is not None and reservation.flops_used == job.flops_used > 0
    with Session(service.engine) as session:
        assert not reservations.settle(session, job_id, 0.0), "a second settlement must change nothing"
        session.commit()
    assert _reservation(service, job_id).flops_used == reservation.flops_used


def test_wall_clock_cap_stops_the_job_with_compute_cap_reached_and_keeps_its_checkpoint(
        service: ServiceContext, tmp_path: Path) -> None:
    agent, job_id = _launch(service, tmp_path, "capped",
                            hyperparameters=quick_hyperparameters(max_steps=100000, save_steps=1000),
                            limits={"max_seconds": 6})
    job = _final(service, agent.id, job_id)
    assert job.state == JobState.failed
    assert job.error["code"] == "compute_cap_reached", job.error
    assert "max_seconds" in job.error["message"]
    kept = jobs.checkpoints(service.engine, job_id)
    assert kept and Path(kept[-1].path).is_dir()
    assert _reservation(service, job_id).settled_at is not None


def test_cancel_stops_a_running_job_and_returns_unused_compute(service: ServiceContext, tmp_path: Path) -> None:
    agent, job_id = _launch(service, tmp_path, "canceller",
                            hyperparameters=quick_hyperparameters(max_steps=100000, save_steps=1000))
    wait_until(lambda: (jobs.get(service.engine, agent.id, job_id).progress.get("step") or 0) >= 2, timeout=120)
    assert jobs.request_cancel(service.engine, agent.id, job_id).state == JobState.cancelling
    job = _final(service, agent.id, job_id, timeout=60)
    assert job.state == JobState.cancelled
    reservation = _reservation(service, job_id)
    assert reservation.settled_at is not None
    assert 0 < reservation.flops_used < reservation.flops_reserved
