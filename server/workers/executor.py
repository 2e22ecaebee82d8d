"""The embedded local executor: claims jobs with a lease and runs each as a child process.

`weightsmith serve` starts one with `worker_slots` slots; `weightsmith worker` runs one alone
against the same database. Each job runs as `python -m training_core SPEC.json` in its own process
group, so a crash, an OOM kill or a cancel never reaches the service. While it runs, the runner
thread relays the child's events to the store, renews the lease (the epoch claimed with is the
fencing token on every write), and escalates a cancel: CANCEL flag, then SIGTERM, then SIGKILL.

A child that dies without a result (killed, OOM) gives its job back by expiring the lease; the
next claim resumes it from its newest checkpoint in the same output directory. A worker that
dies outright stops renewing, and the lease expires on its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, and_, or_
from sqlmodel import col, select

from server.admission import datasets, guardrails
from server.evaluation import evals as evaluation
from server.settings import Settings
from server.store import jobs
from server.store.db import is_sqlite, write_transaction
from server.store.tables import FINAL_STATES, Job, JobState, Model
from training_core.spec import CANCEL_FILE, EVENTS_FILE, JobResult, write_json_atomic

if TYPE_CHECKING:
    from server.tuning.driver import StudyDriver

log = logging.getLogger("weightsmith.executor")

# Variables a training child must not see: it needs nothing of the service's secrets.
_SCRUBBED_PREFIXES = ("WEIGHTSMITH_",)


class LocalExecutor:
    def __init__(self, engine: Engine, settings: Settings, slots: int | None = None, owner: str | None = None):
        self.engine, self.settings = engine, settings
        self.slots = settings.worker_slots if slots is None else slots
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runners: dict[str, _Runner] = {}
        self._studies: dict[str, StudyDriver] = {}
        """Tune jobs' drivers: threads in this process, outside the slots (their trials take those)."""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_recheck = -math.inf

    def start(self) -> None:
        self._thread = threading.Thread(target=self._dispatch, name="weightsmith-dispatch", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now rather than at the next poll (a job was just queued)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, stop running children, and hand their jobs back for the next start."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            runners = list(self._runners.values())
            studies = list(self._studies.values())
        for study in studies:
            study.abandon("service stopping; the study resumes when a worker next runs")
        for runner in runners:
            runner.abandon("service stopping; the job resumes from its checkpoint when a worker next runs")
        for runner in [*studies, *runners]:
            runner.join(timeout)
        if self._thread:
            self._thread.join(timeout)

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._runners)

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._recheck_stale_validations()
                while self._free_slots() > 0 and not self._stopping.is_set():
                    job = claim(self.engine, self.settings, self.owner)
                    if job is None:
                        break
                    runner = _Runner(self, job)
                    with self._lock:  # registered and started at once: `stop` never sees an unstarted runner
                        self._runners[job.id] = runner
                        runner.start()
                while not self._stopping.is_set():
                    study = claim(self.engine, self.settings, self.owner, studies=True)
                    if study is None:
                        break
                    driver = _study_driver(self, study)
                    with self._lock:
                        self._studies[study.id] = driver
                        driver.start()
            except Exception:  # the loop must outlive a passing database error
                log.exception("dispatch failed; retrying")
            self._wake.wait(timeout=min(1.0, self.settings.heartbeat_seconds))
            self._wake.clear()

    def _recheck_stale_validations(self) -> None:
        now = time.monotonic()
        if now - self._last_recheck < self.settings.validation_stale_seconds / 10:
            return
        self._last_recheck = now
        from server.context import ServiceContext  # tools import the executor's modules: import late
        from tools.launch_training import recheck_stale_validations

        if recheck_stale_validations(ServiceContext(settings=self.settings, engine=self.engine, executor=self)):
            self._wake.set()

    def _free_slots(self) -> int:
        with self._lock:
            return self.slots - len(self._runners)

    def _study_done(self, job_id: str) -> None:
        with self._lock:
            self._studies.pop(job_id, None)

    def _done(self, job_id: str) -> None:
        with self._lock:
            self._runners.pop(job_id, None)
        self._wake.set()


def claim(engine: Engine, settings: Settings, owner: str, studies: bool = False) -> Job | None:
    """Take the oldest queued job, or one whose lease expired, bumping its epoch. `studies` picks
    tune jobs (driven in this process) instead of the jobs that run as child processes."""
    while True:
        now = time.time()
        with write_transaction(engine) as session:
            query = select(Job).where(or_(
                col(Job.state) == JobState.queued,
                and_(col(Job.state).in_((JobState.running, JobState.cancelling)), col(Job.lease_expires_at) < now),
            ), (col(Job.kind) == "tune") if studies else (col(Job.kind) != "tune")
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
                jobs._append_event(session, job, "info", "message",
                                   f"{'resumed' if resumed else 'started'} by worker {owner} (run {job.attempts})",
                                   {"worker": owner, "attempt": job.attempts})
            session.add(job)
        if not ended:
            return job


def _end_if_unrunnable(session: Any, job: Job, settings: Settings) -> bool:
    """A job whose worker vanished mid-cancel, or that keeps crashing, ends here instead of running."""
    if job.state == JobState.cancelling and job.kind != "tune":  # a study's driver cancels its trials first
        job.state, job.finished_at = JobState.cancelled, time.time()
    elif job.attempts - job.handed_back > settings.max_attempts:
        job.state, job.finished_at = JobState.failed, time.time()
        job.error = {"code": "crashed", "param": None,
                     "message": f"the training process died {settings.max_attempts} times without a result; "
                                "see get_job_events, then relaunch with a smaller batch or model"}
    else:
        return False
    job.lease_owner = job.lease_expires_at = None
    jobs._append_event(session, job, "warning", "message", f"job {job.state}", {"state": job.state})
    guardrails.settle(session, job.id, job.flops_used)
    return True


class LeasedWork:
    """A thread that works on one claimed job under the epoch it was claimed with (a child process's
    run, or a study). On an unexpected error it gives the job back by expiring the lease, so the
    next claim resumes it; either way it tells the executor it is done. Subclasses write `_run`."""

    thread_prefix = "job"
    failure_reason = "worker error; the job will be resumed"

    def __init__(self, executor: LocalExecutor, job: Job):
        self.executor, self.job = executor, job
        self.engine, self.settings = executor.engine, executor.settings
        self.epoch = job.lease_epoch
        self._abandon_reason: str | None = None
        self._thread = threading.Thread(target=self._run_safely, name=f"{self.thread_prefix}-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def abandon(self, reason: str) -> None:
        self._abandon_reason = reason

    def _run(self) -> None:
        raise NotImplementedError

    def _flops_used(self) -> float | None:
        """What the job has used, recorded when the lease is given back after an error; None keeps the
        total stored with the job, which a child's runner keeps current at every relay (the total the
        run began with would undo what it relayed since)."""
        return None

    def _release(self) -> None:
        self.executor._done(self.job.id)

    def _run_safely(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("%s for %s failed", type(self).__name__, self.job.id)
            jobs.expire_lease(self.engine, self.job.id, self.epoch, self.failure_reason, self._flops_used(),
                              self.job.run_seconds)
        finally:
            self._release()


class _Runner(LeasedWork):
    """Runs one claimed job to the end of this run: spawn, relay, heartbeat, cancel, finish."""

    def __init__(self, executor: LocalExecutor, job: Job):
        super().__init__(executor, job)
        self.run_dir = Path(job.run_dir)

    def _run(self) -> None:
        tail = _EventTail(self.run_dir / EVENTS_FILE, self.job.events_offset)
        if not self._relay_leftovers(tail) or self._settle_unsettled_result():
            return
        job = self.job
        spec_path = self._write_spec()
        log_path = self.run_dir / f"child-{job.attempts}.log"
        started = time.monotonic()
        with log_path.open("ab") as child_log:
            proc = subprocess.Popen(
                training_command(spec_path, int(job.resolved["spec"].get("devices", 1))), stdout=child_log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=_child_env(self.settings), cwd=self.run_dir)
        # progress.flops_used is what the running child has reported; this one has reported nothing yet.
        jobs.relay(self.engine, job.id, self.epoch, [{
            "type": "message", "message": f"training process {proc.pid} started", "data": {"pid": proc.pid}}],
            job.events_offset, {"progress": {**job.progress, "flops_used": 0.0}})
        attempt_flops = 0.0
        cancel_sent = term_sent = None
        last_beat = time.monotonic()
        lost = False
        while True:
            try:
                proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            new_events = tail.read()
            attempt_flops = _latest_flops(new_events, attempt_flops)
            now = time.monotonic()
            if new_events or now - last_beat >= self.settings.heartbeat_seconds:
                # The job's total kept current: if this whole process is killed, nothing settles this
                # run, and its compute would be neither charged nor taken off the next run's cap.
                current = jobs.relay(self.engine, job.id, self.epoch, new_events, tail.offset,
                                     {"flops_used": job.flops_used + attempt_flops})
                alive = current is not None and jobs.renew_lease(
                    self.engine, job.id, self.executor.owner, self.epoch, self.settings.lease_seconds)
                last_beat = now
                if not alive:
                    lost = True  # another worker holds the job now: stop ours, write nothing more
                    _kill_group(proc, signal.SIGKILL)
                elif current.cancel_requested and cancel_sent is None:
                    (self.run_dir / CANCEL_FILE).touch()
                    cancel_sent = now
            if self._abandon_reason and term_sent is None:
                _kill_group(proc, signal.SIGTERM)
                term_sent = now
            grace = self.settings.cancel_grace_seconds
            if cancel_sent is not None and term_sent is None and now - cancel_sent > grace:
                _kill_group(proc, signal.SIGTERM)
                term_sent = now
            if term_sent is not None and now - term_sent > grace:
                _kill_group(proc, signal.SIGKILL)
            if proc.returncode is not None:
                break
        if lost:
            return
        new_events = tail.read()
        attempt_flops = _latest_flops(new_events, attempt_flops)
        jobs.relay(self.engine, job.id, self.epoch, new_events, tail.offset)
        self._settle_run(proc.returncode, attempt_flops, time.monotonic() - started, cancel_sent is not None)

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
            reason = self._abandon_reason or (
                f"training process ended with {how} and no result; the job resumes from its newest checkpoint")
            jobs.expire_lease(self.engine, job.id, self.epoch, reason, flops_used, run_seconds,
                              handed_back=self._abandon_reason is not None)
        elif result.status == JobState.succeeded:
            ON_SUCCESS.get(job.kind, _finish_train)(self.engine, job, self.epoch, result)
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


def _study_driver(executor: LocalExecutor, job: Job) -> StudyDriver:
    # Imported here: the driver prices trials with launch_training's code, which imports the
    # service context, which imports this module.
    from server.tuning.driver import StudyDriver

    return StudyDriver(executor, job)


def _finish_train(engine: Engine, job: Job, epoch: int, result: JobResult) -> None:
    model = _registered_model(job, result)
    finished = jobs.finish(engine, job.id, epoch, JobState.succeeded, metrics=result.metrics, model=model)
    if finished and job.resolved.get("eval_suite"):
        evaluation.queue_after_training(engine, job, model)


def _finish_synth(engine: Engine, job: Job, epoch: int, result: JobResult) -> None:
    """Register the dataset a synth job wrote, with its manifest as lineage, then end the job."""
    resolved = job.resolved
    output = Path(job.output_dir)
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    lineage = {"job_id": job.id, **manifest}
    dataset = datasets.register_generated(
        engine, Path(resolved["datasets_dir"]), resolved["max_record_bytes"], job.agent_id, output / "dataset.jsonl",
        resolved.get("dataset_name") or f"synth-{manifest['task']}-{job.id}", f"synth:{job.id}", lineage)
    metrics = {**result.metrics, "dataset_id": dataset.id, "dataset_hash": dataset.content_hash,
               "dataset_valid": dataset.valid}
    jobs.finish(engine, job.id, epoch, JobState.succeeded, metrics=metrics)


ON_SUCCESS: dict[str, Callable[[Engine, Job, int, JobResult], None]] = {
    "train": _finish_train, "synth": _finish_synth, "eval": evaluation.finish_eval_job}
"""What a succeeded child's result becomes, per job kind: a train job registers a model. Each
handler ends the job with `jobs.finish` under the run's epoch, so a fenced-off worker writes nothing."""


def _registered_model(job: Job, result: JobResult) -> Model:
    resolved = job.resolved
    model = Model(
        agent_id=job.agent_id, name=resolved.get("model_name") or f"{job.method}-{job.id}",
        path=result.model_dir or "", merged_path=result.merged_dir, adapter=resolved["spec"]["adapter"],
        base_model=resolved["base_model"], parent_model_id=resolved.get("parent_model_id"), job_id=job.id,
        dataset_hashes=resolved["dataset_hashes"], config=resolved, metrics=result.metrics,
        parameters=resolved["estimate"]["parameters"])
    lineage = {"model_id": model.id, "job_id": job.id, "base_model": model.base_model,
               "parent_model_id": model.parent_model_id, "dataset_hashes": model.dataset_hashes,
               "adapter": model.adapter, "resolved": resolved, "metrics": result.metrics}
    for directory in filter(None, (result.model_dir, result.merged_dir)):
        Path(directory, "lineage.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
    return model


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


def _kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    # No hub at run time: models and tokenizers load from local directories only.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # CPU training threads that outnumber the free cores stall on each other (seen: 2.3 s steps
    # instead of 0.03 s with two threads on two busy cores), so each child gets its share.
    threads = settings.child_threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, settings.worker_slots))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env
