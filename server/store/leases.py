"""Leases: how a worker holds a job, and how it lets go.

A worker claims the oldest queued job (or one whose lease expired) and bumps its epoch; the epoch
is the fencing token every later write carries (`server.store.jobs.relay`, `finish`), so a worker
whose lease was taken over writes nothing. The claim is handed to the work as a `Lease`: the work
renews it, gives the job back for another run when it cannot finish it, and watches `stopping` for
the service's request to hand the job back at a clean stop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, or_
from sqlmodel import col, select

from server.settings import Settings
from server.store import jobs, reservations
from server.store.db import is_sqlite, write_transaction
from server.store.tables import Job, JobState

log = logging.getLogger("weightsmith.leases")


@dataclass
class Lease:
    """One worker's claim on one job, under the epoch it was claimed with."""

    engine: Engine
    settings: Settings
    job_id: str
    owner: str
    epoch: int
    stop_reason: str | None = None
    """Set when the service is stopping: the work hands the job back (`give_back(handed_back=True)`)."""
    stopping: threading.Event = field(default_factory=threading.Event)

    def renew(self) -> bool:
        """Extend the claim; False once another worker holds the job or it has ended."""
        return jobs.renew_lease(self.engine, self.job_id, self.owner, self.epoch, self.settings.lease_seconds)

    def give_back(self, reason: str, *, flops_used: float | None, run_seconds: float,
                  handed_back: bool = False) -> None:
        """Let the job go for another run, which resumes it from its newest checkpoint. `flops_used`
        None keeps the stored total; `handed_back`: a clean stop, which is not one of its crashes."""
        jobs.expire_lease(self.engine, self.job_id, self.epoch, reason, flops_used, run_seconds, handed_back)

    def stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stopping.set()

    def keep_alive(self) -> LeaseKeeper:
        return LeaseKeeper(self)


class LeaseKeeper:
    """Renews a lease every `heartbeat_seconds` from a thread of its own, so a slow step of the work
    (pricing a trial, hashing a multi-GB snapshot) never lets it expire and another worker take the
    job over. `lost` is set once a renewal fails: the job has another worker, or has ended."""

    def __init__(self, lease: Lease):
        self.lease = lease
        self.lost = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{lease.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _renew(self) -> None:
        while not self._stopped.wait(self.lease.settings.heartbeat_seconds):
            try:
                renewed = self.lease.renew()
            except Exception:  # the database went away for a moment: try again at the next beat
                log.exception("renewing the lease of %s failed", self.lease.job_id)
                continue
            if not renewed:
                self.lost.set()
                return


DRIVEN_KINDS = ("tune", "pipeline")
"""Jobs driven by a thread in the worker's process (their trials and steps are the jobs that train)."""


def claim(engine: Engine, settings: Settings, owner: str, driven: bool = False) -> Lease | None:
    """Take the oldest queued job, or one whose lease expired, bumping its epoch. `driven` picks
    studies and pipeline runs (driven in the worker's process) instead of the jobs that run as child
    processes."""
    while True:
        now = time.time()
        with write_transaction(engine) as session:
            query = select(Job).where(or_(
                col(Job.state) == JobState.queued,
                and_(col(Job.state).in_((JobState.running, JobState.cancelling)), col(Job.lease_expires_at) < now),
            ), col(Job.kind).in_(DRIVEN_KINDS) if driven else col(Job.kind).not_in(DRIVEN_KINDS)
            ).order_by(col(Job.created_at)).limit(1)
            if not is_sqlite(engine):
                query = query.with_for_update(skip_locked=True)
            job = session.exec(query).first()
            if job is None:
                return None
            job.attempts += 1
            job.lease_epoch += 1
            job.lease_owner, job.lease_expires_at = owner, now + settings.lease_seconds
            ended = _end_if_unrunnable(session, job, settings)
            if not ended:
                resumed = job.attempts > 1
                job.state, job.started_at = JobState.running, job.started_at or now
                jobs.append_event(session, job, "info", "message",
                                  f"{'resumed' if resumed else 'started'} by worker {owner} (run {job.attempts})",
                                  {"worker": owner, "attempt": job.attempts})
            session.add(job)
        if not ended:
            return Lease(engine, settings, job.id, owner, job.lease_epoch)


def crashes_left(job: Job, settings: Settings) -> int:
    """Runs that may still die before the job fails as crashed (clean hand-backs do not count)."""
    return settings.max_attempts - (job.attempts - job.handed_back)


def _end_if_unrunnable(session: Any, job: Job, settings: Settings) -> bool:
    """A job whose worker vanished mid-cancel, or that keeps crashing, ends here instead of running."""
    if job.state == JobState.cancelling and job.kind not in DRIVEN_KINDS:  # a driver cancels its jobs first
        job.state, job.finished_at = JobState.cancelled, time.time()
    elif crashes_left(job, settings) < 0:
        job.state, job.finished_at = JobState.failed, time.time()
        job.error = {"code": "crashed", "param": None,
                     "message": f"the training process died {settings.max_attempts} times without a result; "
                                "see get_job_events, then relaunch with a smaller batch or model"}
    else:
        return False
    job.lease_owner = job.lease_expires_at = None
    jobs.append_event(session, job, "warning", "message", f"job {job.state}", {"state": job.state})
    reservations.settle(session, job.id, job.flops_used)
    return True
