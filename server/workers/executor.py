"""The embedded local executor: claims jobs with a lease and hands each to its work.

`weightsmith serve` starts one with `worker_slots` slots; `weightsmith worker` runs one alone
against the same database. A claimed job runs as a child process (`server/workers/child.py`),
in a thread of its own that follows it; a claimed study (`tune` job) or pipeline run is driven by a
thread here (`StudyDriver`, `PipelineDriver`), outside the slots, since its trials and steps take those.
Either way the work gets the job's
`Lease`. On an unexpected error the job is given back, so the next claim resumes it; a worker that
dies outright stops renewing, and the lease expires on its own.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy import Engine
from sqlmodel import Session

from server.admission import snapshots
from server.schedules.pipeline_runs import PipelineDriver
from server.settings import Settings
from server.store import leases
from server.store.leases import Lease
from server.store.tables import Job
from server.tuning.driver import StudyDriver
from server.workers import devices
from server.workers.child import ChildRun, Launcher, LocalLauncher

log = logging.getLogger("weightsmith.executor")


def make_executor(engine: Engine, settings: Settings) -> LocalExecutor:
    """The executor the settings ask for: runs as local child processes, or as Ray jobs."""
    if settings.executor == "ray":
        # Ray is an optional dependency (`pip install -e .[ray]`): imported only when it is chosen.
        from server.workers.ray_executor import RayLauncher

        launcher = RayLauncher(settings)
        return LocalExecutor(engine, settings, launcher=launcher, max_devices=launcher.max_devices)
    return LocalExecutor(engine, settings, max_devices=lambda: settings.max_devices or devices.local_max_devices())


class LocalExecutor:
    def __init__(self, engine: Engine, settings: Settings, slots: int | None = None, owner: str | None = None,
                 launcher: Launcher | None = None, max_devices: Callable[[], int] = devices.local_max_devices):
        """`launcher` starts each run's child (default: on this machine); `max_devices` is what one job
        may ask for."""
        self.engine, self.settings = engine, settings
        self.launcher = launcher or LocalLauncher(settings)
        self._max_devices = max_devices
        self.slots = settings.worker_slots if slots is None else slots
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running: dict[str, tuple[Lease, threading.Thread]] = {}
        """Jobs running as child processes, in the slots."""
        self._drivers: dict[str, tuple[Lease, threading.Thread]] = {}
        """Studies and pipeline runs driven in this process, outside the slots (their jobs take those)."""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_recheck = -math.inf

    def start(self) -> None:
        self._thread = threading.Thread(target=self._dispatch, name="weightsmith-dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now rather than at the next poll (a job was just queued)."""
        self._wake.set()

    def max_devices(self) -> int:
        return self._max_devices()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, stop running children, and hand their jobs back for the next start."""
        with self._lock:  # with `_start`: a lease claimed while stopping is handed back, never left running
            self._stopping.set()
            studies = list(self._drivers.values())
            running = list(self._running.values())
        self._wake.set()
        for lease, _ in studies:
            lease.stop("service stopping; it resumes when a worker next runs")
        for lease, _ in running:
            lease.stop("service stopping; the job resumes from its checkpoint when a worker next runs")
        for _, thread in [*studies, *running]:
            thread.join(timeout)
        if self._thread:
            self._thread.join(timeout)

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._recheck_stale_validations()
                while self._free_slots() > 0 and not self._stopping.is_set():
                    lease = leases.claim(self.engine, self.settings, self.owner)
                    if lease is None:
                        break
                    self._start(self._running, lease, ChildRun(lease, self._job(lease), self.launcher).run,
                                "worker error; the job will be resumed")
                while not self._stopping.is_set():
                    lease = leases.claim(self.engine, self.settings, self.owner, driven=True)
                    if lease is None:
                        break
                    job = self._job(lease)
                    if job.kind == "tune":
                        study = StudyDriver(lease, job, self.wake)
                        self._start(self._drivers, lease, study.run, "study driver error; the study resumes",
                                    study.flops_used)
                    else:
                        pipeline = PipelineDriver(lease, job, self.wake)
                        self._start(self._drivers, lease, pipeline.run, "pipeline driver error; the run resumes")
            except Exception:  # the loop must outlive a passing database error
                log.exception("dispatch failed; retrying")
            self._wake.wait(timeout=min(1.0, self.settings.heartbeat_seconds))
            self._wake.clear()

    def _start(self, registry: dict[str, tuple[Lease, threading.Thread]], lease: Lease, work: Callable[[], None],
               failure_reason: str, flops_used: Callable[[], float | None] = lambda: None) -> None:
        thread = threading.Thread(target=self._follow, args=(registry, lease, work, failure_reason, flops_used),
                                  name=f"job-{lease.job_id}", daemon=True)
        with self._lock:  # registered and started at once: `stop` never sees an unstarted thread
            stopping = self._stopping.is_set()
            if not stopping:
                registry[lease.job_id] = (lease, thread)
                thread.start()
        if stopping:  # claimed as the service began to stop: `stop` would not wait for its work
            lease.give_back("service stopping before the run began; it resumes when a worker next runs",
                            flops_used=None, run_seconds=self._job(lease).run_seconds, handed_back=True)

    def _follow(self, registry: dict[str, tuple[Lease, threading.Thread]], lease: Lease, work: Callable[[], None],
                failure_reason: str, flops_used: Callable[[], float | None]) -> None:
        """Run the work; on an unexpected error give the job back (its stored compute total kept, unless
        the work knows better), so the next claim resumes it."""
        try:
            work()
        except Exception:
            log.exception("work on %s failed", lease.job_id)
            with Session(self.engine) as session:
                job = session.get(Job, lease.job_id)
            lease.give_back(failure_reason, flops_used=flops_used(), run_seconds=job.run_seconds if job else 0.0)
        finally:
            with self._lock:
                registry.pop(lease.job_id, None)
            self._wake.set()

    def _job(self, lease: Lease) -> Job:
        with Session(self.engine) as session:
            job = session.get(Job, lease.job_id)
        assert job is not None
        return job

    def _recheck_stale_validations(self) -> None:
        now = time.monotonic()
        if now - self._last_recheck < self.settings.validation_stale_seconds / 10:
            return
        self._last_recheck = now
        if snapshots.recheck_stale(self.engine, self.settings.validation_stale_seconds):
            self._wake.set()

    def _free_slots(self) -> int:
        with self._lock:
            return self.slots - len(self._running)
