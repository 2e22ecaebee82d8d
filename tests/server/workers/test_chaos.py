"""Chaos on PostgreSQL: two service processes run 20 small jobs while the test kills, at random
(seeded), training processes and whole service processes with SIGKILL, starting a fresh service for
each one killed. Every job must end once, succeeded, with one model; every reservation settle once,
at what its job used; no process outlive its job; and each metric history hold one value a step.

    PYTHONPATH=. python -m pytest -q tests/server/workers/test_chaos.py -s

`WEIGHTSMITH_CHAOS_SEED=7` draws other kills; `WEIGHTSMITH_CHAOS_DEADLINE=1200` (seconds) gives a
loaded machine longer (add `--timeout 1500`).

Nothing is mocked: the services are real processes (`open_service` with its workers and scheduler, as
`weightsmith serve` opens it), the jobs real `python -m training_core` children, the kills real
`kill -9`. Processes are found by scanning /proc for this test's run directories.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from server.service import open_service
from server.settings import Settings
from server.store import agents, jobs
from server.store.tables import FINAL_STATES, Job, JobState, Model, Reservation
from tests import postgres
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tools.get_metric_history import GetMetricHistoryRequest, get_metric_history
from tools.get_quota import GetQuotaRequest, get_quota
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset
from training_core.events import metric_history
from training_core.spec import EVENTS_FILE

ROOT = Path(__file__).resolve().parents[3]
SEED = int(os.environ.get("WEIGHTSMITH_CHAOS_SEED", "22"))
JOBS = 20
MAX_STEPS, SAVE_STEPS = 16, 2
SERVICES, SLOTS = 2, 2
JOB_KILLS, SERVICE_KILLS = 10, 3
MAX_DEATHS = 3
"""A job is not picked for a training-process kill once it has died this often: with the service kills
it stays below `max_attempts` (10 here), or it would rightly fail as crashed."""
DEADLINE_SECONDS = float(os.environ.get("WEIGHTSMITH_CHAOS_DEADLINE", "480"))

SERVICE = """
import signal, sys, threading
from server.service import open_service
from server.settings import Settings
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
with open_service(Settings.model_validate_json(sys.argv[1])) as ctx:
    print(ctx.executor.owner, flush=True)
    while not stopped.wait(1.0):
        pass
"""


class Fleet:
    """The service processes, each started afresh when one is killed."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings, self.log_dir = settings, log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.started += 1
        with (self.log_dir / f"service-{self.started}.log").open("wb") as log:
            command = [sys.executable, "-c", SERVICE, self.settings.model_dump_json()]
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def kill_and_replace(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.processes.remove(process)
        self.start()

    def stop(self) -> list[int | None]:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.processes:
            try:
                codes.append(process.wait(60))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(None)
        return codes

    def logs(self, lines: int = 30) -> str:
        tails = []
        for path in sorted(self.log_dir.glob("service-*.log")):
            tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(tails)


@pytest.mark.slow
def test_twenty_jobs_survive_random_kills_of_their_processes_and_services_on_postgres(
        settings: Settings, tmp_path: Path) -> None:
    bin_dir, reason = postgres.available_or_reason()
    if bin_dir is None:
        pytest.skip(reason)
    rng = random.Random(SEED)
    with postgres.postgres_server(bin_dir) as url:
        settings = settings.model_copy(update={
            "database_url": url, "worker_slots": SLOTS, "child_threads": 1, "max_attempts": 10,
            # Long enough that a service slowed by a loaded machine keeps its leases; a killed one's
            # jobs wait this long for another service.
            "lease_seconds": 5.0, "heartbeat_seconds": 0.5})
        runs_dir = settings.runs_dir.resolve()
        fleet = Fleet(settings, tmp_path)
        started = time.monotonic()
        for _ in range(SERVICES):  # at once, on a fresh database: both migrate and make the local agent
            fleet.start()
        try:
            with open_service(settings, workers=False, scheduler=False) as ctx:
                agent, _ = agents.create_agent(ctx.engine, settings, "chaos", max_concurrent_jobs=JOBS)
                data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
                dataset = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(data))).dataset
                assert dataset is not None
                job_ids = []
                for i in range(JOBS):
                    job = launch_training(ctx, agent, LaunchTrainingRequest.model_validate({
                        "base_model": str(settings.data_roots[1] / "tiny"), "datasets": [dataset.id],
                        "adapter": "full", "idempotency_key": f"chaos-{i}",
                        "hyperparameters": quick_hyperparameters(
                            max_steps=MAX_STEPS, save_steps=SAVE_STEPS, per_device_batch_size=2,
                            max_seq_length=32)})).job
                    assert job is not None
                    job_ids.append(job.id)
                kills, overlaps = _make_chaos(ctx.engine, fleet, runs_dir, job_ids, rng, started)
                wall = time.monotonic() - started
                leftover = _left_over_children(runs_dir)
                codes = fleet.stop()
                figures = _figures(ctx.engine, agent.id, job_ids)
                print(f"\n[chaos] {JOBS} jobs, {kills['job']} job kills, {kills['service']} service kills, "
                      f"resumes {figures['resumes']}, wall {wall:.0f} s (seed {SEED}; "
                      f"{figures['from_checkpoint']} runs resumed from a checkpoint, "
                      f"{figures['recomputed']} steps recomputed, {fleet.started} service processes)")
                _check_jobs(ctx, agent, job_ids)
        finally:
            fleet.stop()
        survivors = _processes_mentioning(str(settings.home.resolve()))
    assert overlaps == [], f"a job ran in two processes at once: {overlaps}"
    assert leftover == {}, f"training processes outlived their jobs: {leftover}"
    assert codes == [0] * SERVICES, f"services did not stop cleanly: {codes}\n{fleet.logs()}"
    assert survivors == {}, f"processes left over: {survivors}"
    assert kills["job"] > 0 and kills["service"] > 0, kills


def _make_chaos(engine: Any, fleet: Fleet, runs_dir: Path, job_ids: list[str], rng: random.Random,
                started: float) -> tuple[Counter[str], list[tuple[str, list[int]]]]:
    """Kill training processes and services at random until the kill budgets are spent, and wait for
    every job to end. Returns the kills made, and each time a job had two live training processes."""
    kills: Counter[str] = Counter()
    overlaps: list[tuple[str, list[int]]] = []
    first_seen: dict[int, float] = {}
    next_kill = time.monotonic() + rng.uniform(2.0, 5.0)
    target: str | int | None = None
    """The next kill: "service", a training step to kill a training process at, or 0 while it loads."""
    while True:
        with Session(engine) as session:
            rows = list(session.exec(select(Job).where(col(Job.id).in_(job_ids))))
        if all(job.state in FINAL_STATES for job in rows):
            return kills, overlaps
        assert time.monotonic() - started < DEADLINE_SECONDS, (
            f"jobs unfinished after {DEADLINE_SECONDS:.0f} s: "
            f"{Counter(job.state for job in rows)}, kills {dict(kills)}\n{fleet.logs()}")
        died = [process.pid for process in fleet.processes if process.poll() is not None]
        assert died == [], f"service processes {died} ended on their own\n{fleet.logs()}"
        children = _training_processes(runs_dir)
        for pid in children:
            first_seen.setdefault(pid, time.time())
        by_job: dict[str, list[int]] = {}
        for pid, job_id in children.items():
            by_job.setdefault(job_id, []).append(pid)
        overlaps += [(job_id, pids) for job_id, pids in by_job.items() if len(pids) > 1]
        jobs_left, services_left = JOB_KILLS - kills["job"], SERVICE_KILLS - kills["service"]
        if target is None and time.monotonic() >= next_kill and jobs_left + services_left > 0:
            # A service whenever it runs a job; a training process mostly at a step drawn at random
            # (it resumes from the checkpoint before it), sometimes while it loads (it starts over).
            if rng.random() * (jobs_left + services_left) < services_left:
                target = "service"
            else:
                target = rng.randint(1, MAX_STEPS - 1) if rng.random() < 0.8 else 0
        killed = False
        if target == "service":
            killed = _kill_a_busy_service(fleet, rows, rng)
        elif isinstance(target, int):
            killed = _kill_a_training_process(children, rows, runs_dir, first_seen, target, rng)
        if killed:
            kills["service" if target == "service" else "job"] += 1
            next_kill, target = time.monotonic() + rng.uniform(1.0, 4.0), None
        time.sleep(0.25)  # the polling tick of this loop, which is bounded by the deadline above


def _kill_a_training_process(children: dict[int, str], rows: list[Job], runs_dir: Path,
                             first_seen: dict[int, float], at_step: int, rng: random.Random) -> bool:
    """SIGKILL a training process that has reached `at_step`, or with 0 one still loading; False if
    none has."""
    deaths = {job.id: job.attempts - 1 - job.handed_back for job in rows}
    reached = {pid: _step_reached(runs_dir / job_id, first_seen[pid]) for pid, job_id in children.items()
               if deaths.get(job_id, 0) < MAX_DEATHS}
    candidates = sorted(pid for pid, step in reached.items() if (step >= at_step if at_step else step == 0))
    if not candidates:
        return False
    try:
        os.kill(rng.choice(candidates), signal.SIGKILL)
    except ProcessLookupError:  # it ended just now
        return False
    return True


def _kill_a_busy_service(fleet: Fleet, rows: list[Job], rng: random.Random) -> bool:
    """SIGKILL a service that holds at least one running job, and start a fresh one in its place."""
    owners = {job.lease_owner for job in rows if job.state == JobState.running and job.lease_owner}
    busy = [p for p in fleet.processes if p.poll() is None and any(f":{p.pid}:" in owner for owner in owners)]
    if not busy:
        return False
    fleet.kill_and_replace(rng.choice(busy))
    return True


def _training_processes(runs_dir: Path) -> dict[int, str]:
    """Live `python -m training_core` processes of this test's jobs, pid -> job id, read from /proc."""
    found = {}
    for pid, args in _processes():
        if "training_core" in args:
            for arg in args:
                if arg.startswith(str(runs_dir)) and arg.endswith("spec.json"):
                    found[pid] = Path(arg).parent.name
    return found


def _processes_mentioning(text: str) -> dict[int, list[str]]:
    return {pid: args for pid, args in _processes() if pid != os.getpid() and any(text in a for a in args)}


def _processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # it ended while we looked
            continue
        if raw:  # a zombie has none: it has ended, and waits for its parent to read its status
            found.append((int(entry.name), [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]))
    return found


def _step_reached(run_dir: Path, since: float) -> int:
    """The training step the run's newest event reports, if written after `since`; 0 for none."""
    try:
        with (run_dir / EVENTS_FILE).open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            event = json.loads(handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except (OSError, ValueError):
        return 0
    if event.get("type") not in ("metrics", "checkpoint") or event.get("time", 0) <= since:
        return 0
    return int((event.get("data") or {}).get("step") or 0)


def _left_over_children(runs_dir: Path) -> dict[int, str]:
    """Training processes still alive a while after every job ended: none should be."""
    try:
        wait_until(lambda: not _training_processes(runs_dir), timeout=15)
    except AssertionError:
        pass
    return _training_processes(runs_dir)


def _check_jobs(ctx: Any, agent: Any, job_ids: list[str]) -> None:
    """Each job ended once, succeeded, with one model; its reservation settled once at what it used,
    which is what its runs used; its metric history holds one value a step, the one the model went on
    from."""
    problems: list[str] = []
    used = 0.0
    with Session(ctx.engine) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job is not None
            used += job.flops_used
            events = jobs.events(ctx.engine, agent.id, job_id, 0, 100_000)
            endings = [e for e in events if "state" in e.data]
            models = list(session.exec(select(Model).where(Model.job_id == job_id)))
            held = list(session.exec(select(Reservation).where(Reservation.job_id == job_id)))
            if job.state != JobState.succeeded:
                problems.append(f"{job_id}: {job.state} {job.error}")
            if len(endings) != 1:
                problems.append(f"{job_id}: ended {len(endings)} times: {[e.message for e in endings]}")
            saved = len(models) == 1 and Path(models[0].path, "config.json").exists()
            if not saved or job.model_id != models[0].id:
                problems.append(f"{job_id}: models {[(m.id, m.path) for m in models]}, its {job.model_id}")
            settled = len(held) == 1 and held[0].settled_at is not None
            if not settled or held[0].flops_used != pytest.approx(job.flops_used):
                problems.append(f"{job_id}: reservations {[(r.settled_at, r.flops_used) for r in held]}, "
                                f"job used {job.flops_used}")
            raw: list[dict[str, Any]] = [{"type": e.type, "data": e.data} for e in events]
            used_by_run: dict[str, float] = {}
            for event in raw:  # each run reports what it has used so far, from zero
                if event["type"] == "metrics" and "flops_used" in event["data"]:
                    used_by_run[event["data"]["run"]] = float(event["data"]["flops_used"])
            if job.flops_used != pytest.approx(sum(used_by_run.values())):
                problems.append(f"{job_id}: charged {job.flops_used}, its {len(used_by_run)} runs used "
                                f"{sum(used_by_run.values())}")
            problems += _history_problems(ctx, agent, job_id, raw)
        spent = get_quota(ctx, agent, GetQuotaRequest()).budget_flops_spent
    if spent != pytest.approx(used):
        problems.append(f"budget spent {spent}, jobs used {used}")
    assert problems == [], "\n".join(problems)


def _history_problems(ctx: Any, agent: Any, job_id: str, raw: list[dict[str, Any]]) -> list[str]:
    """The history tool shows each step once, with the value of the lineage the model came from. In the
    raw events each run's steps follow one another from the checkpoint it resumed from, and no run reports
    again once a later one has begun: a step is there twice only because a later run recomputed it."""
    problems = []
    request = GetMetricHistoryRequest(job_id=job_id, metric="loss", max_points=1000)
    history = get_metric_history(ctx, agent, request)
    lineage = metric_history(raw, "loss")
    if history.steps != list(range(1, MAX_STEPS + 1)):
        problems.append(f"{job_id}: history steps {history.steps}")
    if list(zip(history.steps, history.values, strict=True)) != lineage:
        problems.append(f"{job_id}: history {list(zip(history.steps, history.values))}, lineage {lineage}")
    runs: list[str] = []  # in the order they first reported a step
    previous = furthest = 0
    for event in raw:
        data = event["data"]
        if event["type"] != "metrics" or data.get("loss") is None:
            continue
        step, run = int(data["step"]), data["run"]
        if runs and run == runs[-1]:
            if step != previous + 1:
                problems.append(f"{job_id}: run {run} reported step {step} after step {previous}")
        elif run in runs:
            problems.append(f"{job_id}: run {run} reported step {step} after run {runs[-1]} began")
        else:
            runs.append(run)
            # From a checkpoint an earlier run reached, and listed: a run killed between saving a checkpoint
            # and announcing it leaves it to the run that resumes from it to announce.
            resumed_from = data["resumed_from"]
            if resumed_from and resumed_from not in history.checkpoints:
                problems.append(f"{job_id}: run {run} resumed from step {resumed_from}, which is not among the "
                                f"listed checkpoints {history.checkpoints}")
            if resumed_from % SAVE_STEPS or resumed_from > furthest or step != resumed_from + 1:
                problems.append(f"{job_id}: run {run} began at step {step}, resumed from {resumed_from}; "
                                f"earlier runs reached step {furthest}")
        previous, furthest = step, max(furthest, step)
    return problems


def _figures(engine: Any, agent_id: str, job_ids: list[str]) -> dict[str, int]:
    figures: Counter[str] = Counter()
    for job_id in job_ids:
        events = jobs.events(engine, agent_id, job_id, 0, 100_000)
        figures["resumes"] += sum(e.message.startswith("resumed by worker") for e in events)
        figures["from_checkpoint"] += sum(e.message.startswith("resuming from step") for e in events)
        steps = [e.data["step"] for e in events if e.type == "metrics" and e.data.get("loss") is not None]
        figures["recomputed"] += len(steps) - len(set(steps))
    return dict(figures)
