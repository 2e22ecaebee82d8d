"""One run of a job as a child process: `python -m training_core SPEC.json` in its own process group,
so a crash, an OOM kill or a cancel never reaches the service.

While it runs, the run relays the child's events to the store, renews the lease (the epoch claimed
with is the fencing token on every write), and escalates a cancel: CANCEL flag, then SIGTERM, then
SIGKILL. A child that dies without a result (killed, OOM) gives its job back; the next claim resumes
it from its newest checkpoint in the same output directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from sqlmodel import Session

from server.settings import Settings
from server.store import jobs
from server.store.db import write_transaction
from server.store.leases import Lease, crashes_left
from server.store.tables import FINAL_STATES, Job, JobState
from server.workers.outcomes import ON_SUCCESS, finish_train
from training_core import cgroups
from training_core.spec import CANCEL_FILE, EVENTS_FILE, JobResult, write_json_atomic

# Variables a training child must not see: it needs nothing of the service's secrets.
_SCRUBBED_PREFIXES = ("WEIGHTSMITH_",)


class ChildRun:
    """Runs one claimed job to the end of this run: spawn, relay, heartbeat, cancel, settle."""

    def __init__(self, lease: Lease, job: Job, launcher: Launcher):
        self.lease, self.job, self.launcher = lease, job, launcher
        self.engine, self.settings = lease.engine, lease.settings
        self.epoch = lease.epoch
        self.run_dir = Path(job.run_dir)
        self.out_of_memory = False
        """The run's process tree went over its control group's memory and was killed."""

    def run(self) -> None:
        tail = _EventTail(self.run_dir / EVENTS_FILE, self.job.events_offset)
        if not self._relay_leftovers(tail) or self._settle_unsettled_result():
            return
        job = self.job
        spec_path = self._write_spec()
        log_path = self.run_dir / f"child-{job.attempts}.log"
        started = time.monotonic()
        proc = self.launcher.start(job, spec_path, child_env(self.settings), log_path)
        # progress.flops_used is what the running child has reported; this one has reported nothing yet.
        jobs.relay(self.engine, job.id, self.epoch, [{
            "type": "message", "message": f"training process {proc.name} started", "data": {"process": proc.name}}],
            job.events_offset, {"progress": {**job.progress, "flops_used": 0.0}})
        attempt_flops = 0.0
        cancel_sent = term_sent = None
        last_beat = time.monotonic()
        lost = False
        while True:
            returncode = proc.wait(0.25)
            new_events = tail.read()
            attempt_flops = _latest_flops(new_events, attempt_flops)
            now = time.monotonic()
            if new_events or now - last_beat >= self.settings.heartbeat_seconds:
                # The job's total kept current: if this whole process is killed, nothing settles this
                # run, and its compute would be neither charged nor taken off the next run's cap.
                current = jobs.relay(self.engine, job.id, self.epoch, new_events, tail.offset,
                                     {"flops_used": job.flops_used + attempt_flops})
                alive = current is not None and self.lease.renew()
                last_beat = now
                if not alive:
                    lost = True  # another worker holds the job now: stop ours, write nothing more
                    proc.kill()
                elif current.cancel_requested and cancel_sent is None:
                    (self.run_dir / CANCEL_FILE).touch()
                    cancel_sent = now
            if self.lease.stopping.is_set() and term_sent is None:
                proc.terminate()
                term_sent = now
            grace = self.settings.cancel_grace_seconds
            if cancel_sent is not None and term_sent is None and now - cancel_sent > grace:
                proc.terminate()
                term_sent = now
            if term_sent is not None and now - term_sent > grace:
                proc.kill()
            if returncode is not None:
                break
        self.out_of_memory = proc.close()  # whatever is left of the run's processes is gone after this
        if lost:
            return
        new_events = tail.read()
        attempt_flops = _latest_flops(new_events, attempt_flops)
        jobs.relay(self.engine, job.id, self.epoch, new_events, tail.offset)
        self._settle_run(returncode, attempt_flops, time.monotonic() - started, cancel_sent is not None)

    def _relay_leftovers(self, tail: _EventTail) -> bool:
        """Relay and charge what the previous run wrote after its worker's last relay; False if the
        lease is lost meanwhile.

        Only a worker killed outright leaves such events: its child lives on for a moment (see
        training_core's `_exit_with_parent`), and nothing settled that run. The job's `flops_used`
        holds that run's compute up to its last relayed report (`progress.flops_used`); the child's
        newest report is in these events. They are not this run's: its own count starts at zero.
        """
        leftover = tail.read()
        if not leftover:
            return True
        relayed = float(self.job.progress.get("flops_used") or 0.0)
        flops_used = self.job.flops_used - relayed + _latest_flops(leftover, relayed)
        job = jobs.relay(self.engine, self.job.id, self.epoch, leftover, tail.offset, {"flops_used": flops_used})
        if job is None:
            return False
        self.job = job
        return True

    def _settle_unsettled_result(self) -> bool:
        """Settle the previous run's result.json, if it left one, instead of training again; True if it did.

        A run that ends with a result is settled at once, and a settled result ends the job, so a result
        in the run directory of a job being claimed is one that nobody settled: its worker died (or
        failed) between the child's exit and the settle. Its model is saved; a new child would train
        again from the newest checkpoint, and the job would pay for those steps twice.
        """
        if JobResult.read(self.run_dir) is None:
            return False
        # The job's total holds that run's compute up to its last relayed report; the result has all of it.
        relayed = float(self.job.progress.get("flops_used") or 0.0)
        job = jobs.relay(self.engine, self.job.id, self.epoch, [{
            "type": "message", "message": "the previous run ended with a result that its worker did not "
            "record; recording it rather than training again", "data": {}}], self.job.events_offset,
            {"flops_used": self.job.flops_used - relayed})
        if job is None:
            return True  # another worker holds the job now, and settles it
        self.job = job
        self._settle_run(0, 0.0, 0.0, cancelled=False)
        return True

    def _settle_run(self, returncode: int, attempt_flops: float, seconds: float, cancelled: bool) -> None:
        job = self.job
        result = JobResult.read(self.run_dir)
        if result is not None:
            attempt_flops = result.flops_used
        flops_used, run_seconds = job.flops_used + attempt_flops, job.run_seconds + seconds
        with write_transaction(self.engine) as session:  # totals first: `finish` settles against them
            row = session.get(Job, job.id)
            if row is None or row.lease_epoch != self.epoch or row.state in FINAL_STATES:
                return
            row.flops_used, row.run_seconds = flops_used, run_seconds
            session.add(row)
        if result is None and cancelled:
            jobs.finish(self.engine, job.id, self.epoch, JobState.cancelled,
                        error={"code": "cancelled", "message": "cancelled; the process was stopped", "param": None})
        elif result is None:
            how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
            reason = self.lease.stop_reason or self._lost_reason(how)
            self.lease.give_back(reason, flops_used=flops_used, run_seconds=run_seconds,
                                 handed_back=self.lease.stop_reason is not None)
        elif result.status == JobState.succeeded:
            ON_SUCCESS.get(job.kind, finish_train)(self.engine, job, self.epoch, result)
        else:
            jobs.finish(self.engine, job.id, self.epoch, result.status, error=result.error, metrics=result.metrics)

    def _write_spec(self) -> Path:
        """This run's spec: the job's, with its caps reduced by what earlier runs used."""
        job = self.job
        raw: dict[str, Any] = json.loads(json.dumps(job.resolved["spec"]))
        limits = raw["limits"]
        if limits.get("max_seconds") is not None:
            limits["max_seconds"] = max(1.0, limits["max_seconds"] - job.run_seconds)
        if limits.get("max_flops") is not None:
            limits["max_flops"] = max(0.0, limits["max_flops"] - job.flops_used)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "spec.json"
        write_json_atomic(path, raw)
        (self.run_dir / CANCEL_FILE).unlink(missing_ok=True)
        return path


    def _lost_reason(self, how: str) -> str:
        """What the job's events say of a run that died: it resumes, unless that was its last allowed death."""
        with Session(self.engine) as session:
            row = session.get(Job, self.job.id)
        if row is not None and crashes_left(row, self.settings) <= 0:
            return (f"training process ended with {how} and no result, for the {self.settings.max_attempts}th "
                    "time; the job fails as crashed")
        if self.out_of_memory:
            how += f", out of memory (the job's limit is {self.settings.job_memory_mb:,} MB: job_memory_mb)"
        return f"training process ended with {how} and no result; the job resumes from its newest checkpoint"


def training_command(spec_path: Path, devices: int) -> list[str]:
    """`python -m training_core SPEC`, or for several devices the same under `accelerate launch`
    (torchrun underneath: one process per device, gloo on CPUs, NCCL on GPUs). Every process is in
    the job's process group, so cancel and fail-over reach them all."""
    if devices == 1:
        return [sys.executable, "-m", "training_core", str(spec_path)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(devices), "--mixed_precision", "no", "--dynamo_backend", "no",
            # a free port per job, so two several-device jobs on one machine do not collide
            "--main_process_port", "0", "-m", "training_core", str(spec_path)]


class _EventTail:
    """Reads whole new lines of the child's events file; a half-written last line waits."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in chunk[:end].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"level": "warning", "type": "message", "message": f"unreadable event: {line[:200]!r}"})
        return events


def _latest_flops(events: list[dict[str, Any]], current: float) -> float:
    for event in events:
        if event.get("type") == "metrics" and "flops_used" in (event.get("data") or {}):
            current = float(event["data"]["flops_used"])
    return current



class RunningChild(Protocol):
    """One run's process (tree) as the run follows it, wherever it runs."""

    name: str
    """How events name it: a pid, or a Ray submission id."""

    def wait(self, seconds: float) -> int | None:
        """Its exit status once it has ended (negative: killed by that signal), else None."""

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> bool:
        """Reap what is left; whether it was killed for going over its memory."""


class Launcher(Protocol):
    """Starts a run's child: on this machine (`LocalLauncher`), or on a cluster (the Ray executor's)."""

    def start(self, job: Job, spec_path: Path, env: dict[str, str], log_path: Path) -> RunningChild: ...


class LocalLauncher:
    """Each run as a child process group of this worker, in a control group where the machine allows."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def start(self, job: Job, spec_path: Path, env: dict[str, str], log_path: Path) -> RunningChild:
        command = training_command(spec_path, int(job.resolved["spec"].get("devices", 1)))
        group = job_group(self.settings)
        with log_path.open("ab") as child_log:
            proc = subprocess.Popen(
                group.wrap(command) if group else command, stdout=child_log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=spec_path.parent)
        return _LocalChild(proc, group)


class _LocalChild:
    def __init__(self, proc: subprocess.Popen[bytes], group: cgroups.ControlGroup | None):
        self.proc, self.group, self.name = proc, group, str(proc.pid)

    def wait(self, seconds: float) -> int | None:
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> bool:
        usage = self.group.remove() if self.group else None  # kills what is left of the tree
        return bool(usage and usage.oom_kills)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def job_group(settings: Settings) -> cgroups.ControlGroup | None:
    """A control group for a run's whole process tree (its sandboxes included), where the machine
    allows one: memory, process count and CPU bounded together, not per process. None elsewhere; the
    service says so at start."""
    if not cgroups.available().version:
        return None
    return cgroups.create("job", memory_bytes=settings.job_memory_mb << 20, max_processes=settings.job_max_processes,
                          cpu_quota=float(child_threads(settings)))


def child_threads(settings: Settings) -> int:
    # CPU training threads that outnumber the free cores stall on each other (seen: 2.3 s steps
    # instead of 0.03 s with two threads on two busy cores), so each child gets its share.
    return settings.child_threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, settings.worker_slots))


def child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    # No hub at run time: models and tokenizers load from local directories only.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(child_threads(settings)))
    return env
