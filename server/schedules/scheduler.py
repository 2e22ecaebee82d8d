"""The scheduler: fires due schedules inside the service, each due firing exactly once.

Every service process runs one (`open_service`); each tick it takes a lease on the schedules that are
due (`next_fire_at` passed; event-triggered ones every tick), so two processes never work on one
schedule at once, and records each firing under a unique (schedule, fire time) key before starting
anything, so a firing that two processes both saw starts once. Starting the work uses the key
`schedule:ID:TIME`, so a process that dies between recording a firing and starting its job leaves
the next tick to finish it, never to start a second job.

A firing is admitted exactly as the agent's own call would be. A refusal is recorded on the run with
its reason and counts as a failure, like a run whose job fails; `pause_after_failures` in a row pause
the schedule. The schedule moves on to its next fire time either way: it never spins on refusals.

Time is `clock()` (injectable): tests drive `tick(now)` directly.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import LimitExceeded, WeightsmithError
from server.schedules import conditions, definitions, outputs, pipeline_runs, triggers, work
from server.store import jobs
from server.store.db import write_transaction
from server.store.tables import ACTIVE_STATES, FINAL_STATES, Agent, Dataset, Job, JobState, Schedule, ScheduleRun

log = logging.getLogger("weightsmith.scheduler")
LEASE_SECONDS = 30.0
STARTING = "starting"
EVENT_MARGIN_SECONDS = 10.0


class Scheduler:
    def __init__(self, ctx: ServiceContext, owner: str, clock: Callable[[], float] = time.time,
                 interval: float = 1.0):
        self.ctx, self.owner, self.clock, self.interval = ctx, owner, clock, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="weightsmith-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the loop must outlive a passing database error
                log.exception("scheduler tick failed; retrying")

    def tick(self, now: float | None = None) -> int:
        """Fire what is due at `now`; the number of firings recorded."""
        now = self.clock() if now is None else now
        fired = 0
        for schedule in self._claim(now):
            try:
                fired += self._handle(schedule, now)
            finally:
                self._release(schedule.id)
        self._settle_runs()
        return fired

    # Which schedules, and the lease on them.

    def _claim(self, now: float) -> list[Schedule]:
        with Session(self.ctx.engine) as session:
            ids = list(session.exec(select(Schedule.id).where(
                Schedule.state == "active",
                or_(col(Schedule.next_fire_at) <= now, col(Schedule.next_fire_at).is_(None),
                    col(Schedule.buffered_fire_at).is_not(None)),
                or_(col(Schedule.lease_expires_at).is_(None), col(Schedule.lease_expires_at) < now))))
        # In an order of its own: service processes that claim at once then share the due schedules,
        # where in one order a process that started a moment late trails the other and claims none.
        random.shuffle(ids)
        claimed = []
        for schedule_id in ids:
            with write_transaction(self.ctx.engine) as session:
                result = session.execute(update(Schedule).where(
                    col(Schedule.id) == schedule_id, col(Schedule.state) == "active",
                    or_(col(Schedule.lease_expires_at).is_(None), col(Schedule.lease_expires_at) < now),
                ).values(lease_owner=self.owner, lease_expires_at=now + LEASE_SECONDS))
                if result.rowcount == 1:
                    schedule = session.get(Schedule, schedule_id)
                    assert schedule is not None
                    claimed.append(schedule)
        return claimed

    def _release(self, schedule_id: str) -> None:
        with write_transaction(self.ctx.engine) as session:
            session.execute(update(Schedule).where(col(Schedule.id) == schedule_id,
                                                   col(Schedule.lease_owner) == self.owner)
                            .values(lease_owner=None, lease_expires_at=None))

    # Firing.

    def _handle(self, schedule: Schedule, now: float) -> int:
        trigger = triggers.load_trigger(schedule.trigger)
        policies = triggers.Policies.model_validate(schedule.policies)
        fired = 0
        self._finish_starting(schedule)
        if schedule.buffered_fire_at is not None and not self._running(schedule.id):
            fired += self.fire(schedule, schedule.buffered_fire_at, {}, now, buffered=True)
        if isinstance(trigger, triggers.AfterTrigger | triggers.DatasetTrigger):
            for fire_time, context in self._events(schedule, trigger):
                fired += self.fire(schedule, fire_time, context, now)
            # A little behind now: an event committed just after the query, with an earlier time, is
            # seen at the next tick; its firing's unique key keeps it from firing twice.
            self._update(schedule.id, last_fire_at=max(schedule.last_fire_at, now - EVENT_MARGIN_SECONDS))
            return fired
        end = policies.end_at.timestamp() if policies.end_at else None
        until = min(now, end) if end else now
        for fire in triggers.due(trigger, _utc(schedule.last_fire_at), _utc(until), policies.catch_up):
            fired += self.fire(schedule, fire.timestamp(), {}, now)
        schedule = self._reload(schedule.id)
        ran_out = policies.max_runs is not None and schedule.runs >= policies.max_runs
        ended = (end is not None and now >= end) or ran_out
        next_look = None if ended else definitions.next_look(schedule, trigger, now)
        self._update(schedule.id, last_fire_at=now, next_fire_at=next_look,
                     **({"state": "ended", "state_reason": "its end time or max_runs was reached"}
                        if ended or (next_look is None and schedule.state == "active") else {}))
        return fired

    def fire(self, schedule: Schedule, fire_time: float, context: dict[str, Any], now: float,
              buffered: bool = False) -> int:
        """Record the firing (once, whichever process gets there first), then start its work."""
        schedule = self._reload(schedule.id)
        if schedule.state != "active":
            return 0
        if buffered:
            self._update(schedule.id, buffered_fire_at=None)
        elif not self._record(schedule.id, fire_time):
            return 0
        policies = triggers.Policies.model_validate(schedule.policies)
        running = self._running(schedule.id)
        decision = "start" if buffered else triggers.overlap_decision(
            policies.overlap, len(running), int(schedule.buffered_fire_at is not None))
        if decision == "skip":
            self._set_run(schedule.id, fire_time, "skipped", reason=f"the previous run ({running[0]}) was still "
                          "going (overlap skip)")
            return 1
        if decision == "buffer":
            self._set_run(schedule.id, fire_time, "buffered", reason=f"waits for {running[0]} to end (buffer_one)")
            self._update(schedule.id, buffered_fire_at=fire_time)
            return 1
        if decision == "cancel_previous_then_start":
            for job_id in running:
                jobs.request_cancel(self.ctx.engine, schedule.agent_id, job_id)
        self._start(schedule, fire_time, context)
        return 1

    def _start(self, schedule: Schedule, fire_time: float, context: dict[str, Any]) -> None:
        with Session(self.ctx.engine) as session:
            agent = session.get(Agent, schedule.agent_id)
        assert agent is not None
        key = f"schedule:{schedule.id}:{fire_time:.3f}"
        try:
            request = _with_trigger(schedule.request, context)
            self._check_own_budget(schedule, agent, request, fire_time)
            if schedule.kind == "pipeline":
                job = pipeline_runs.admit_pipeline(self.ctx, agent, request, context, key=key, schedule_id=schedule.id)
            else:
                job = work.start(self.ctx, agent, schedule.kind, request, key=key, origin={"schedule_id": schedule.id})
        except WeightsmithError as err:
            self._set_run(schedule.id, fire_time, "refused", reason=str(err))
            self._failed(schedule.id, f"a firing was refused: {err.message}")
            return
        self._set_run(schedule.id, fire_time, "started", job_id=job.id)
        with write_transaction(self.ctx.engine) as session:
            session.execute(update(Schedule).where(col(Schedule.id) == schedule.id)
                            .values(runs=Schedule.runs + 1))

    def _check_own_budget(self, schedule: Schedule, agent: Agent, request: dict[str, Any], fire_time: float) -> None:
        if schedule.budget_flops is None:
            return
        since = fire_time - schedule.budget_window_seconds
        with Session(self.ctx.engine) as session:
            spent = session.exec(select(func.coalesce(func.sum(Job.flops_used), 0.0)).where(
                Job.schedule_id == schedule.id, Job.created_at >= since)).one()
        price = 0.0 if schedule.kind == "pipeline" else work.price_flops(self.ctx, agent, schedule.kind, request)
        if spent + price > schedule.budget_flops:
            raise LimitExceeded(f"the schedule's own budget ({schedule.budget_flops:.3g} FLOPs per "
                                f"{schedule.budget_window_seconds:g} s) has {schedule.budget_flops - spent:.3g} left "
                                f"and this firing costs {price:.3g}", param="budget_flops")

    def _finish_starting(self, schedule: Schedule) -> None:
        """Firings a process recorded and then died before starting: start them now (their key keeps
        a job that was in fact started from being started again)."""
        with Session(self.ctx.engine) as session:
            stuck = session.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule.id,
                                                            ScheduleRun.state == STARTING)).all()
        for run in stuck:
            self._start(schedule, run.fire_time, {})

    # Events: the work an `after` schedule follows, the datasets an `on_dataset` one watches.

    def _events(self, schedule: Schedule, trigger: triggers.TriggerModel) -> list[tuple[float, dict[str, Any]]]:
        found: list[tuple[float, dict[str, Any]]] = []
        with Session(self.ctx.engine) as session:
            if isinstance(trigger, triggers.DatasetTrigger):
                for dataset in session.exec(select(Dataset).where(
                        Dataset.agent_id == schedule.agent_id, Dataset.name == trigger.on_dataset,
                        Dataset.created_at > schedule.last_fire_at, Dataset.created_at > schedule.created_at)):
                    found.append((dataset.created_at, {"dataset_id": dataset.id}))
                return sorted(found, key=lambda f: f[0])
            assert isinstance(trigger, triggers.AfterTrigger)
            query = select(Job).where(Job.agent_id == schedule.agent_id, col(Job.state).in_(FINAL_STATES),
                                      col(Job.finished_at) > schedule.last_fire_at)
            query = query.where(Job.id == trigger.after) if trigger.after.startswith("job_") else query.where(
                Job.schedule_id == trigger.after, col(Job.pipeline_job_id).is_(None))
            ended = list(session.exec(query))
        condition = conditions.parse(trigger.when, "trigger.when", triggers.AFTER_CONTEXT)
        for job in sorted(ended, key=lambda j: j.finished_at or 0.0):
            made = outputs.of_job(self.ctx.engine, job)
            verdict = condition.check(made)
            if verdict.held:
                found.append((job.finished_at or 0.0, {"job_id": job.id, "model_id": made.get("model_id"),
                                                         "report_id": made.get("report_id")}))
            elif self._record(schedule.id, job.finished_at or 0.0):
                self._set_run(schedule.id, job.finished_at or 0.0, "skipped", reason=f"{job.id} ended and "
                              f"{verdict.reason}")
        return found

    # Runs and their outcomes.

    def _record(self, schedule_id: str, fire_time: float) -> bool:
        """The firing's row, made once: False if another process (or an earlier tick) made it."""
        try:
            with write_transaction(self.ctx.engine) as session:
                session.add(ScheduleRun(schedule_id=schedule_id, fire_time=fire_time, state=STARTING))
        except IntegrityError:
            return False
        return True

    def _set_run(self, schedule_id: str, fire_time: float, state: str, *, job_id: str | None = None,
                 reason: str = "") -> None:
        with write_transaction(self.ctx.engine) as session:
            run = session.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id,
                                                         ScheduleRun.fire_time == fire_time)).one()
            run.state, run.job_id, run.reason = state, job_id or run.job_id, reason[:2000]
            session.add(run)

    def _running(self, schedule_id: str) -> list[str]:
        with Session(self.ctx.engine) as session:
            return list(session.exec(select(Job.id).where(
                Job.schedule_id == schedule_id, col(Job.pipeline_job_id).is_(None),
                col(Job.state).in_(ACTIVE_STATES))))

    def _settle_runs(self) -> None:
        """Runs whose jobs ended: succeeded resets the schedule's failures, failed adds one."""
        with Session(self.ctx.engine) as session:
            ended = session.exec(select(ScheduleRun, Job).where(
                ScheduleRun.state == "started", col(ScheduleRun.job_id) == col(Job.id),
                col(Job.state).in_(FINAL_STATES))).all()
        for run, job in ended:
            succeeded = job.state == JobState.succeeded
            reason = "" if succeeded else (job.error or {}).get("message", job.state)
            self._set_run(run.schedule_id, run.fire_time, "succeeded" if succeeded else "failed", reason=reason)
            if succeeded:
                self._update(run.schedule_id, consecutive_failures=0)
            else:
                self._failed(run.schedule_id, f"run {job.id} {job.state}: {reason}")

    def _failed(self, schedule_id: str, why: str) -> None:
        with write_transaction(self.ctx.engine) as session:
            schedule = session.get(Schedule, schedule_id)
            assert schedule is not None
            schedule.consecutive_failures += 1
            limit = triggers.Policies.model_validate(schedule.policies).pause_after_failures
            if limit is not None and schedule.consecutive_failures >= limit and schedule.state == "active":
                schedule.state = "paused"
                schedule.state_reason = (f"paused after {schedule.consecutive_failures} failed or refused runs in a "
                                         f"row; the last: {why}. update_schedule resume starts it again")
            session.add(schedule)

    def _update(self, schedule_id: str, **values: Any) -> None:
        with write_transaction(self.ctx.engine) as session:
            session.execute(update(Schedule).where(col(Schedule.id) == schedule_id).values(**values))

    def _reload(self, schedule_id: str) -> Schedule:
        with Session(self.ctx.engine) as session:
            schedule = session.get(Schedule, schedule_id)
        assert schedule is not None
        return schedule


def fire_now(ctx: ServiceContext, schedule: Schedule, now: float) -> ScheduleRun:
    """Fire a schedule by hand, as its trigger would at `now` (its policies apply)."""
    scheduler = Scheduler(ctx, owner=f"hand:{schedule.id}")
    scheduler.fire(schedule, now, {}, now)
    with Session(ctx.engine) as session:
        return session.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule.id,
                                                      ScheduleRun.fire_time == now)).one()


def _with_trigger(request: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """The request with `${trigger.X}` filled in from what fired it."""
    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, str) and value.startswith("${trigger.") and value.endswith("}"):
            return context.get(value[len("${trigger."):-1], value)
        return value

    return fill(request)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
