"""The job store's operations: read an agent's jobs, ask for a cancel, record what workers see.

Workers write through `relay` and `finish`, which carry the lease epoch they claimed with: a
worker whose lease was taken over (it stalled, another worker reclaimed the job) writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from server.store import reservations
from server.store.db import owned, write_transaction
from server.store.tables import (
    ACTIVE_STATES,
    FINAL_STATES,
    Checkpoint,
    Job,
    JobEvent,
    JobState,
    Model,
)


def get(engine: Engine, agent_id: str, job_id: str) -> Job:
    with Session(engine) as session:
        return owned(session, Job, job_id, agent_id, "job_id")


def list_for_agent(engine: Engine, agent_id: str, *, states: Sequence[str] = (), kind: str | None = None,
                   limit: int = 20, before: float | None = None) -> list[Job]:
    """Newest first; `before` is the `created_at` of the last job of the previous page."""
    query = select(Job).where(Job.agent_id == agent_id)
    if states:
        query = query.where(col(Job.state).in_(states))
    if kind:
        query = query.where(Job.kind == kind)
    if before is not None:
        query = query.where(Job.created_at < before)
    with Session(engine) as session:
        return list(session.exec(query.order_by(col(Job.created_at).desc()).limit(limit)))


def events(engine: Engine, agent_id: str, job_id: str, after_seq: int = 0, limit: int = 50,
           types: Sequence[str] = ()) -> list[JobEvent]:
    get(engine, agent_id, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    if types:
        query = query.where(col(JobEvent.type).in_(types))
    with Session(engine) as session:
        return list(session.exec(query.order_by(col(JobEvent.seq)).limit(limit)))


def metric_series(engine: Engine, agent_id: str, job_id: str, metric: str) -> tuple[list[tuple[int, float]], list[str]]:
    """One metric by step, one value a step: a run resumed from a checkpoint computes the steps after
    it again, and the newest value of a step is the one the model went on from. And every metric
    name the job reported."""
    by_step: dict[int, float] = {}
    names: set[str] = set()
    after = 0
    while True:
        rows = events(engine, agent_id, job_id, after, 1000, ("metrics",))
        for event in rows:
            names.update(k for k, v in event.data.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            value = event.data.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step[int(event.data.get("step", 0))] = float(value)
        if len(rows) < 1000:
            break
        after = rows[-1].seq
    names -= {"step", "max_steps"}
    return sorted(by_step.items()), sorted(names)


def checkpoints(engine: Engine, job_id: str) -> list[Checkpoint]:
    with Session(engine) as session:
        return list(session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                 .order_by(col(Checkpoint.step))))


def request_cancel(engine: Engine, agent_id: str, job_id: str) -> Job:
    """A job not yet running ends at once; a running one is asked to stop (see executor)."""
    with write_transaction(engine) as session:
        job = owned(session, Job, job_id, agent_id, "job_id")
        if job.state in (JobState.validating, JobState.queued):
            job.state, job.finished_at = JobState.cancelled, time.time()
            job.error = {"code": "cancelled", "message": "cancelled before it started", "param": None}
            reservations.settle(session, job.id, 0.0)
        elif job.state == JobState.running:
            job.state, job.cancel_requested = JobState.cancelling, True
        session.add(job)
        append_event(session, job, "info", "message", f"cancel requested; state {job.state}", {})
        session.flush()
        session.refresh(job)
        return job


def relay(engine: Engine, job_id: str, epoch: int, new_events: list[dict[str, Any]], offset: int,
          extra: dict[str, Any] | None = None) -> Job | None:
    """Store a batch of the child's events; None when this worker no longer holds the lease."""
    with write_transaction(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_epoch != epoch:
            return None
        for event in new_events:
            data = event.get("data") or {}
            append_event(session, job, event.get("level", "info"), event.get("type", "message"),
                          event.get("message", ""), data, event.get("time"))
            if event.get("type") == "metrics":
                job.progress = {**job.progress, **data}
            elif event.get("type") == "checkpoint":
                _record_checkpoint(session, job.id, data)
        job.events_offset = offset
        for key, value in (extra or {}).items():
            setattr(job, key, value)
        session.add(job)
        session.flush()
        session.refresh(job)
        return job


def finish(engine: Engine, job_id: str, epoch: int, state: str, *, error: dict[str, Any] | None = None,
           metrics: dict[str, Any] | None = None, model: Model | None = None,
           also: Callable[[Session, Job], None] | None = None) -> bool:
    """End a job and settle its reservation against the compute it used, in one transaction;
    `also` writes what follows from the ending (a train job's eval) in that same transaction."""
    with write_transaction(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_epoch != epoch or job.state in FINAL_STATES:
            return False
        if model is not None:
            session.add(model)
            job.model_id = model.id
        job.state, job.error, job.finished_at = state, error, time.time()
        job.metrics = {**job.metrics, **(metrics or {})}
        job.lease_owner, job.lease_expires_at = None, None
        message = f"job {state}" + (f": {error['message']}" if error else "")
        append_event(session, job, "error" if state == JobState.failed else "info", "message", message,
                      {"state": state, **({"error": error} if error else {})})
        session.add(job)
        reservations.settle(session, job.id, job.flops_used)
        if also is not None:
            also(session, job)
        return True


def expire_lease(engine: Engine, job_id: str, epoch: int, reason: str, flops_used: float | None,
                 run_seconds: float, handed_back: bool = False) -> None:
    """Give a job back for another run: it resumes from its newest checkpoint when a worker next
    claims it. `flops_used` None keeps the stored total. `handed_back`: the service is stopping, and
    this run is not one of the job's crashes."""
    with write_transaction(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_epoch != epoch:
            return
        job.lease_expires_at = time.time()
        job.handed_back += handed_back
        if flops_used is not None:
            job.flops_used = flops_used
        job.run_seconds = run_seconds
        append_event(session, job, "warning", "message", reason, {})
        session.add(job)


def renew_lease(engine: Engine, job_id: str, owner: str, epoch: int, lease_seconds: float) -> bool:
    with write_transaction(engine) as session:
        result = session.execute(
            update(Job).where(col(Job.id) == job_id, col(Job.lease_epoch) == epoch, col(Job.lease_owner) == owner,
                              col(Job.state).in_(ACTIVE_STATES))
            .values(lease_expires_at=time.time() + lease_seconds))
    return result.rowcount == 1


def cancel_requested(engine: Engine, job_id: str) -> bool:
    with Session(engine) as session:
        return bool(session.exec(select(Job.cancel_requested).where(Job.id == job_id)).one())


def append_event(session: Session, job: Job, level: str, type_: str, message: str, data: dict[str, Any],
                  when: float | None = None) -> None:
    job.event_seq += 1
    session.add(JobEvent(job_id=job.id, seq=job.event_seq, time=when or time.time(), level=level, type=type_,
                         message=message, data=data))


def _record_checkpoint(session: Session, job_id: str, data: dict[str, Any]) -> None:
    step = int(data.get("step", 0))
    existing = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)).first()
    if existing is None:
        session.add(Checkpoint(job_id=job_id, step=step, path=str(data.get("path", "")),
                               metrics=data.get("metrics") or {}))
