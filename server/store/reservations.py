"""Reservations: compute held for a job from admission until it is settled, exactly once, against
what it used; and the agent's rolling budget they add up to.

Admission (`server.admission.guardrails`) reads these inside the transaction that inserts the job,
with the agent's row locked (`lock_agent`), so concurrent admissions never spend one budget twice.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, func, update
from sqlmodel import Session, col, select

from server.store.db import is_sqlite
from server.store.tables import ACTIVE_STATES, Agent, Job, Reservation, Usage


def budget_spent(session: Session, agent: Agent, now: float) -> float:
    """Compute charged in the rolling window: what settled jobs used, what open ones reserved, and
    what serving used (`Usage`).

    A study's trials are left out: their compute is carved out of the study's own reservation."""
    charged = func.coalesce(Reservation.flops_used, Reservation.flops_reserved)
    window_start = now - agent.budget_window_seconds
    jobs = session.exec(
        select(func.coalesce(func.sum(charged), 0.0)).where(
            Reservation.agent_id == agent.id, Reservation.created_at >= window_start,
            col(Reservation.within_job_id).is_(None))
    ).one()
    served = session.exec(select(func.coalesce(func.sum(Usage.flops), 0.0)).where(
        Usage.agent_id == agent.id, Usage.created_at >= window_start)).one()
    return float(jobs) + float(served)


def seconds_until_budget_frees(session: Session, agent: Agent, now: float) -> float:
    """When the oldest charge in the window leaves it: a refused caller may try again then."""
    window_start = now - agent.budget_window_seconds
    oldest = [session.exec(select(func.min(table.created_at)).where(
        table.agent_id == agent.id, table.created_at >= window_start)).one() for table in (Reservation, Usage)]
    times = [t for t in oldest if t is not None]
    return max(1.0, min(times) + agent.budget_window_seconds - now) if times else 1.0


def record_usage(session: Session, agent_id: str, kind: str, model_id: str | None, tokens: int, flops: float) -> None:
    session.add(Usage(agent_id=agent_id, kind=kind, model_id=model_id, tokens=tokens, flops=flops))


def active_job_count(session: Session, agent: Agent) -> int:
    return session.exec(
        select(func.count()).select_from(Job).where(Job.agent_id == agent.id, col(Job.state).in_(ACTIVE_STATES))
    ).one()


def lock_agent(session: Session, engine: Engine, agent_id: str) -> Agent:
    """Re-read the agent inside the admission transaction, serialising its admissions."""
    query = select(Agent).where(Agent.id == agent_id)
    if not is_sqlite(engine):  # SQLite already holds the database write lock (BEGIN IMMEDIATE)
        query = query.with_for_update()
    return session.exec(query).one()


def settle(session: Session, job_id: str, flops_used: float) -> bool:
    """Charge a job's reservation with what it used. Only the first call for a job has any effect."""
    result = session.execute(
        update(Reservation)
        .where(col(Reservation.job_id) == job_id, col(Reservation.settled_at).is_(None))
        .values(flops_used=flops_used, settled_at=time.time())
    )
    return result.rowcount == 1
