"""A Ray cluster's Jobs API as the Ray executor uses it: one training child per submission.

    ray_jobs = RayJobs("http://HEAD:8265")                     # the head's dashboard (Jobs API)
    args, resources = training_entrypoint(spec_path, devices=1, gpu=False)
    submission = ray_jobs.submit(job.id, job.attempts, args, env, resources, cwd=run_dir)
    ray_jobs.status(submission)      # SubmissionStatus(state="running", ...): renew the lease meanwhile
    logs = LogTail(ray_jobs, submission); logs.read()          # new whole lines of the child's output
    ray_jobs.stop(submission)        # SIGTERM to the child, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S

A submission runs the same `python -m training_core SPEC` as a local child (or, across devices,
`python -m training_core.ray_train SPEC --workers N`), with our job id and run in its submission id
(`ws-<job_id>-<attempt>`), so `ray job list` shows which job each is and a new run never reuses an
old run's id (Ray refuses that). The child talks back through files, as locally: `events.jsonl`,
checkpoints and `result.json` in its run directory, which must be on a storage path every node of
the cluster reaches.

How a run ended is read from the run directory, as the local executor does: `result.json` says what
the job did; a submission that ended without one died (killed, OOM, node lost) and the job resumes
from its newest checkpoint. training_core exits 0 exactly when it wrote a result, so Ray's
`succeeded` means a result is there (wait for it to appear: a network file system can show it a
moment late), and `failed` or `stopped` without a result means the run died.

What a cluster needs, and what it does not get from here:
- Every node runs the same weightsmith (and torch) as the service, installed in the environment the
  node was started from: `python` in an entrypoint is the node's, found on its PATH (the `python`
  argument names another). Nothing is uploaded; tests put the source tree on PYTHONPATH instead.
- `env` is all the child gets of ours: the service's own environment (its secrets) never travels.
  Ray's runtime environment carries it to the child and, for Ray Train, to every worker.
- A worker that dies leaves its submission running; the next claim of the job must stop the job's
  earlier submissions (`submissions(job_id)`) before it submits, or two runs write one output dir.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

SUBMISSION_PREFIX = "ws-"


class RayJobsError(RuntimeError):
    """The Jobs API refused or could not be reached; the message says what to check."""


@dataclass(frozen=True)
class Resources:
    """What the entrypoint process reserves on the cluster while it runs (Ray places it on a node
    that has them free; it waits as `pending` until one does)."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: int | None = None


@dataclass(frozen=True)
class SubmissionStatus:
    submission_id: str
    state: str
    """`pending`, `running`, `succeeded`, `failed` or `stopped` (Ray's job states, lower case)."""
    message: str
    """Ray's account, e.g. why it failed to start (runtime environment, resources never free)."""
    exit_code: int | None
    """The entrypoint's exit code once it ended; None before, or when it never started."""

    @property
    def ended(self) -> bool:
        return self.state in ("succeeded", "failed", "stopped")


def submission_id(job_id: str, attempt: int) -> str:
    return f"{SUBMISSION_PREFIX}{job_id}-{attempt}"


def training_entrypoint(spec_path: Path, devices: int, gpu: bool, cpus_per_device: float = 1.0
                        ) -> tuple[list[str], Resources]:
    """The child's arguments (after `python`) and what its entrypoint reserves.

    One device: `-m training_core SPEC` on a node with that device free. Several: Ray Train's
    `-m training_core.ray_train SPEC --workers N`, whose entrypoint reserves nothing itself (it only
    coordinates) while each of its N workers reserves one device, on whichever nodes have them:
    reserving the devices for the entrypoint too would leave the workers waiting for them forever.
    """
    if devices == 1:
        return ["-m", "training_core", str(spec_path)], Resources(cpus=cpus_per_device, gpus=1.0 if gpu else 0.0)
    args = ["-m", "training_core.ray_train", str(spec_path), "--workers", str(devices),
            "--cpus-per-worker", str(cpus_per_device)]
    return [*args, "--gpu"] if gpu else args, Resources()


class RayJobs:
    def __init__(self, address: str, python: str = "python"):
        """`address` is the head's dashboard URL (`http://HEAD:8265`), where the Jobs API answers."""
        self.address, self.python = address, python
        try:
            self._client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RayJobsError(f"cannot reach the Ray Jobs API at {address!r}: {error}. Give the head's "
                               "dashboard address (http://HEAD:8265; `ray start --head --include-dashboard "
                               "true --dashboard-host 0.0.0.0`)") from error

    def submit(self, job_id: str, attempt: int, entrypoint_args: list[str], env: dict[str, str],
               resources: Resources, cwd: Path | None = None) -> str:
        """Start `python ARGS` on the cluster as run `attempt` of `job_id`; returns the submission id.

        Submitting the same run again (a retry after a lost reply) returns its id without a second run.
        """
        sid = submission_id(job_id, attempt)
        command = shlex.join([self.python, *entrypoint_args])
        # `exec`: the child is the entrypoint process itself, so Ray's stop signals reach it directly
        # and its parent is the job's supervisor (training_core exits when its parent does).
        entrypoint = f"cd {shlex.quote(str(cwd))} && exec {command}" if cwd else f"exec {command}"
        try:
            return self._client.submit_job(
                entrypoint=entrypoint, submission_id=sid, runtime_env={"env_vars": dict(env)},
                metadata={"weightsmith_job_id": job_id, "attempt": str(attempt)},
                entrypoint_num_cpus=resources.cpus or None, entrypoint_num_gpus=resources.gpus or None,
                entrypoint_memory=resources.memory_bytes)
        except RuntimeError as error:
            if self._exists(sid):
                return sid
            raise RayJobsError(f"the Ray Jobs API at {self.address} refused job {job_id} run {attempt}: "
                               f"{error}") from error

    def status(self, sid: str) -> SubmissionStatus:
        try:
            return _status(self._client.get_job_info(sid))
        except RuntimeError as error:
            raise RayJobsError(f"no Ray job {sid} at {self.address}: {error}") from error

    def stop(self, sid: str) -> bool:
        """Ask Ray to stop the run: SIGTERM to the child, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
        (3 s by default, set on the cluster). False if it had already ended. The service's own
        cooperative cancel (the CANCEL file) comes first; this is the escalation."""
        return self._client.stop_job(sid)

    def submissions(self, job_id: str) -> list[SubmissionStatus]:
        """Every run of `job_id` the cluster remembers, oldest first."""
        prefix = f"{SUBMISSION_PREFIX}{job_id}-"
        runs: dict[int, SubmissionStatus] = {}
        for info in self._client.list_jobs():
            sid = info.submission_id or ""
            if sid.startswith(prefix) and sid[len(prefix):].isdigit():  # not job `<job_id>-x`'s runs
                runs[int(sid[len(prefix):])] = _status(info)
        return [runs[attempt] for attempt in sorted(runs)]

    def logs(self, sid: str) -> str:
        """The child's whole output so far (stdout and stderr), as Ray keeps it on the node it ran on."""
        return self._client.get_job_logs(sid)

    def _exists(self, sid: str) -> bool:
        try:
            self._client.get_job_info(sid)
        except RuntimeError:
            return False
        return True


def _status(info: JobDetails) -> SubmissionStatus:
    return SubmissionStatus(submission_id=info.submission_id or "", state=JobStatus(info.status).value.lower(),
                            message=info.message or "", exit_code=info.driver_exit_code)


class LogTail:
    """New whole lines of a submission's output at each `read`, for relaying into the job's events.

    Polls the whole log and keeps an offset rather than holding Ray's log websocket open: the
    executor's runner already polls on its heartbeat, a poll survives a head restart, and a training
    child's output is small (progress goes to events.jsonl, not stdout).
    """

    def __init__(self, ray_jobs: RayJobs, sid: str):
        self.ray_jobs, self.sid, self.offset = ray_jobs, sid, 0

    def read(self) -> list[str]:
        text = self.ray_jobs.logs(self.sid)
        end = text.rfind("\n", self.offset) + 1
        if end <= self.offset:
            return []
        lines = text[self.offset:end].splitlines()
        self.offset = end
        return lines
