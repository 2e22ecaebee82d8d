"""A worker process killed outright: its lease expires and another worker resumes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from server.admission.train import TrainRequest, build_train_job
from server.context import ServiceContext
from server.service import open_service
from server.settings import Settings
from server.store import agents as auth
from server.store import jobs, leases
from server.store.db import write_transaction
from server.store.leases import claim
from server.store.tables import Agent, Dataset, Job, JobState, Reservation
from server.workers import child
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tools.get_quota import GetQuotaRequest, get_quota
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset
from training_core.spec import JobResult

ROOT = Path(__file__).resolve().parents[3]


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WEIGHTSMITH_HOME": str(settings.home), "WEIGHTSMITH_LEASE_SECONDS": "3",
           "WEIGHTSMITH_HEARTBEAT_SECONDS": "0.5", "WEIGHTSMITH_WORKER_SLOTS": "1"}
    return subprocess.Popen([sys.executable, "-m", "server.cli.main", "worker"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _queue_chat_job(ctx: ServiceContext, settings: Settings, tmp_path: Path, agent_name: str, records: int,
                    **hyperparameters: int) -> tuple[Agent, Job]:
    """A new agent and its full fine-tuning job of the tiny model on chat records, queued."""
    agent, _ = auth.create_agent(ctx.engine, settings, agent_name)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(records))
    ds = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset.id
    job = launch_training(ctx, agent, LaunchTrainingRequest.model_validate({
        "base_model": str(settings.data_roots[1] / "tiny"), "datasets": [ds], "adapter": "full",
        "hyperparameters": quick_hyperparameters(**hyperparameters)})).job
    assert job is not None
    return agent, job


def test_a_sigkilled_worker_loses_its_lease_and_a_second_worker_resumes_the_job(settings: Settings,
                                                                                tmp_path: Path) -> None:
    with open_service(settings, workers=False) as ctx:
        agent, job = _queue_chat_job(ctx, settings, tmp_path, "failover", records=64, max_steps=300, save_steps=10)
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


def test_a_result_its_worker_did_not_record_is_recorded_by_the_next_run_without_training_again(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker fails between the child's exit (result.json written, model saved) and recording it:
    # the lease is given back, and the next claim finds the result.
    settle = child.ChildRun._settle_run
    failures = []

    def fail_once(run: child.ChildRun, *args: Any, **kwargs: Any) -> None:
        if not failures:
            failures.append(run.job.id)
            raise OSError("the worker's database went away")
        settle(run, *args, **kwargs)

    monkeypatch.setattr(child.ChildRun, "_settle_run", fail_once)
    with open_service(settings) as ctx:
        agent, job = _queue_chat_job(ctx, settings, tmp_path, "unrecorded", records=32, max_steps=12, save_steps=4)
        done = wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, job.id)).state in
                          (JobState.succeeded, JobState.failed) and j, timeout=240)
        messages = [e.message for e in jobs.events(ctx.engine, agent.id, job.id, 0, 2000)]
        spent = get_quota(ctx, agent, GetQuotaRequest()).budget_flops_spent
    result = JobResult.read(Path(done.run_dir))
    assert failures == [job.id]
    assert done.state == JobState.succeeded, done.error
    assert done.attempts == 2 and done.model_id is not None
    assert sum(m.startswith("training process") and m.endswith("started") for m in messages) == 1, messages
    assert result is not None and done.flops_used == pytest.approx(result.flops_used)  # charged once
    assert spent == pytest.approx(result.flops_used)


def test_jobs_left_validating_by_a_crash_are_checked_again_and_run_or_fail(settings: Settings,
                                                                           tmp_path: Path) -> None:
    """A process that dies between inserting a job and checking its snapshots leaves it `validating`
    with nobody to finish the check: a worker checks it again once it is stale."""
    settings = settings.model_copy(update={"validation_stale_seconds": 1.0})
    with open_service(settings, workers=False) as ctx:
        agent, _ = auth.create_agent(ctx.engine, settings, "crashed-check")
        good, tampered, gone = (upload_dataset(ctx, agent, UploadDatasetRequest(
            path=str(write_jsonl(tmp_path / f"{name}.jsonl", chat_records(16 + i))))).dataset for i, name in
            enumerate(("good", "tampered", "gone")))
        left = []
        for datasets in ([good.id], [tampered.id], [good.id, gone.id]):
            request = TrainRequest.model_validate({
                "base_model": str(settings.data_roots[1] / "tiny"), "datasets": datasets, "adapter": "full",
                "hyperparameters": quick_hyperparameters(max_steps=2)})
            built = build_train_job(ctx, agent, request)
            job, estimate = built.job, built.estimate
            with write_transaction(ctx.engine) as session:  # what launch_training commits before its check
                session.add(job)
                session.flush()
                session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=estimate.flops))
            left.append(job.id)
        with Session(ctx.engine) as session:
            snapshot = Path(session.get(Dataset, tampered.id).path)
        snapshot.chmod(0o644)
        snapshot.write_text(snapshot.read_text() + "\n", encoding="utf-8")
        with write_transaction(ctx.engine) as session:  # nothing deletes a dataset; a hand in the database might
            session.delete(session.get(Dataset, gone.id))
    assert [jobs.get(ctx.engine, agent.id, j).state for j in left] == [JobState.validating] * 3
    with open_service(settings) as ctx:
        ran, failed, short = (wait_until(lambda j=j: (row := jobs.get(ctx.engine, agent.id, j)).state in
                                         (JobState.succeeded, JobState.failed) and row, timeout=120) for j in left)
        assert ran.state == JobState.succeeded, ran.error
        assert failed.state == JobState.failed and failed.error["code"] == "invalid_dataset"
        # Not trained on the datasets that remain:
        assert short.state == JobState.failed and short.error["code"] == "invalid_dataset"
        assert gone.id in short.error["message"] and short.error["param"] == "datasets"
        with Session(ctx.engine) as session:  # each reservation settled once, at what its job used
            settled = {r.job_id: r.flops_used for r in session.exec(select(Reservation).where(
                col(Reservation.job_id).in_(left))) if r.settled_at is not None}
        assert settled == {ran.id: ran.flops_used, failed.id: 0.0, short.id: 0.0} and ran.flops_used > 0
        assert get_quota(ctx, agent, GetQuotaRequest()).budget_flops_spent == ran.flops_used


def test_a_job_outlives_more_clean_service_restarts_than_max_attempts(settings: Settings, tmp_path: Path) -> None:
    restarts = settings.max_attempts + 1  # each claim is a run; before, the run after the 3rd restart failed it
    with open_service(settings, workers=False) as ctx:
        agent, job = _queue_chat_job(ctx, settings, tmp_path, "restarted", records=32, max_steps=48, save_steps=8)
    for run in range(1, restarts + 1):
        with open_service(settings) as ctx:  # leaving it stops the service, which hands the run back
            wait_until(lambda run=run: (j := jobs.get(ctx.engine, agent.id, job.id)).attempts == run
                       and j.state == JobState.running, timeout=120, interval=0.05)
    with open_service(settings) as ctx:
        done = wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, job.id)).state in
                          (JobState.succeeded, JobState.failed) and j, timeout=240)
    assert done.state == JobState.succeeded, done.error
    assert (done.attempts, done.handed_back) == (restarts + 1, restarts)


def test_a_job_claimed_just_as_the_service_stops_is_handed_back_and_not_run(settings: Settings, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with open_service(settings, workers=False) as ctx:
        agent, job = _queue_chat_job(ctx, settings, tmp_path, "late-claim", records=8, max_steps=4)
    claimed = threading.Event()
    real_claim = leases.claim

    def claim_until_the_stop_begins(*args: Any, **kwargs: Any) -> leases.Lease | None:
        lease = real_claim(*args, **kwargs)
        if lease is not None and lease.job_id == job.id:
            claimed.set()
            wait_until(lambda: ctx.executor is not None and ctx.executor._stopping.is_set(), timeout=30, interval=0.01)
        return lease

    monkeypatch.setattr(leases, "claim", claim_until_the_stop_begins)
    with open_service(settings) as ctx:
        assert claimed.wait(60)
    monkeypatch.undo()
    row = jobs.get(ctx.engine, agent.id, job.id)
    messages = [e.message for e in jobs.events(ctx.engine, agent.id, job.id, 0, 200)]
    assert (row.state, row.attempts, row.handed_back) == (JobState.running, 1, 1), messages
    assert not any(m.startswith("training process") for m in messages), messages
    with open_service(settings) as ctx:
        done = wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, job.id)).state in
                          (JobState.succeeded, JobState.failed) and j, timeout=120)
    assert done.state == JobState.succeeded and done.attempts == 2, done.error


def test_a_job_whose_runs_keep_crashing_fails_after_max_attempts_counting_no_clean_stop(settings: Settings) -> None:
    with open_service(settings, workers=False) as ctx:
        agent = auth.ensure_local_agent(ctx.engine, settings)
        rows = {handed_back: Job(agent_id=agent.id, state=JobState.running, attempts=settings.max_attempts,
                                 handed_back=handed_back, lease_expires_at=time.time() - 1)
                for handed_back in (0, 1)}  # each had its lease expire in its last run
        with write_transaction(ctx.engine) as session:
            session.add_all(rows.values())
        for _ in rows:
            claim(ctx.engine, settings, "worker-a")
        crashed, resumed = (jobs.get(ctx.engine, agent.id, rows[n].id) for n in (0, 1))
    assert crashed.state == JobState.failed and crashed.error is not None and crashed.error["code"] == "crashed"
    assert resumed.state == JobState.running and resumed.attempts == settings.max_attempts + 1
