"""Jobs on a Ray cluster: the local executor's dispatch, leases and runs, with each run's child started
as a Ray job (the Jobs API) instead of a child process of the worker.

    WEIGHTSMITH_EXECUTOR=ray WEIGHTSMITH_RAY_ADDRESS=http://HEAD:8265 weightsmith serve

The service stays the source of truth: it claims the job under its lease, writes the spec into the
run directory (on storage every node reaches: the service home), submits `python -m training_core
SPEC` (Ray Train's entry point across several devices) with the job id in the submission id, and then
follows the run exactly as it follows a local child: events and `result.json` through the run
directory, the lease renewed while Ray says the run is alive, a cancel as the CANCEL file and then
Ray's stop, a run that dies resumed by the next claim from its newest checkpoint. The child's output
goes to the run's log file, as a local child's does.

Ray is imported only when this executor is chosen: a service without Ray never loads it.
"""

from __future__ import annotations

import time
from pathlib import Path

from server.settings import Settings
from server.store.tables import Job
from server.workers.child import RunningChild
from server.workers.ray_jobs import LogTail, RayJobs, training_entrypoint

STATUS_INTERVAL = 1.0
"""Seconds between two questions to the Jobs API about one run (its HTTP API, not free)."""
CHILD_ENV = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PYTHONPATH", "TOKENIZERS_PARALLELISM")
"""What a Ray child gets of the worker's environment (with HF_*): not the worker's PATH or secrets."""


class RayLauncher:
    def __init__(self, settings: Settings):
        assert settings.ray_address, "the Ray executor needs ray_address"
        self.settings = settings
        self.ray = RayJobs(settings.ray_address, python=settings.ray_python)

    def start(self, job: Job, spec_path: Path, env: dict[str, str], log_path: Path) -> RunningChild:
        # A worker that died left its run going on the cluster: stop it before a new run writes the
        # same output directory.
        for earlier in self.ray.submissions(job.id):
            if not earlier.ended:
                self.ray.stop(earlier.submission_id)
        args, resources = training_entrypoint(spec_path, int(job.resolved["spec"].get("devices", 1)),
                                              self.settings.ray_gpus)
        passed = {k: v for k, v in env.items() if k in CHILD_ENV or k.startswith(("HF_", "TRANSFORMERS_"))}
        sid = self.ray.submit(job.id, job.attempts, args, passed, resources, cwd=spec_path.parent)
        return _RayChild(self.ray, sid, log_path)

    def max_devices(self) -> int:
        """What one job may ask for: `max_devices`, set to what a job may spread over (the cluster's
        GPUs, or CPU processes); one device until it is set. (The dashboard's own node listing is
        empty on a head started for the Jobs API alone, so it cannot be counted from here.)"""
        return self.settings.max_devices or 1


class _RayChild:
    """A run submitted to Ray, followed by asking the Jobs API (at most every STATUS_INTERVAL)."""

    def __init__(self, ray: RayJobs, sid: str, log_path: Path):
        self.ray, self.name, self.log_path = ray, sid, log_path
        self.logs = LogTail(ray, sid)
        self._asked = 0.0

    def wait(self, seconds: float) -> int | None:
        time.sleep(seconds)
        if time.monotonic() - self._asked < STATUS_INTERVAL:
            return None
        self._asked = time.monotonic()
        status = self.ray.status(self.name)
        self._copy_logs()
        if not status.ended:
            return None
        # training_core exits 0 exactly when it wrote its result; the run directory says the rest.
        return {"succeeded": 0, "stopped": -15}.get(status.state, status.exit_code or 1)

    def terminate(self) -> None:
        self.ray.stop(self.name)

    def kill(self) -> None:
        self.ray.stop(self.name)

    def close(self) -> bool:
        self._copy_logs()
        return False  # Ray reports no memory kill of its own; the log says what happened

    def _copy_logs(self) -> None:
        lines = self.logs.read()
        if lines:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.writelines(line + "\n" for line in lines)
