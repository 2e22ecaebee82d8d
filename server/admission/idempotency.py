"""Idempotency keys: a retry with the same key returns the same job; the same key with a different
request is a conflict. The request is compared by a hash of its canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine
from sqlmodel import Session, select

from server.errors import Conflict
from server.store.tables import Job


def request_hash(request: BaseModel) -> str:
    return request_hash_of(request.model_dump(mode="json"))


def request_hash_of(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def existing_job(engine: Engine, agent_id: str, key: str, hash_: str) -> Job | None:
    with Session(engine) as session:
        return existing_in(session, agent_id, key, hash_)


def existing_in(session: Session, agent_id: str, key: str, hash_: str) -> Job | None:
    """The agent's job made with `key`, if any; Conflict when it was made for another request."""
    existing = session.exec(select(Job).where(Job.agent_id == agent_id, Job.idempotency_key == key)).first()
    if existing is not None and existing.request_hash != hash_:
        raise Conflict(f"idempotency_key was used for a different request (job {existing.id}); "
                       "use a new key for a new request", param="idempotency_key")
    return existing


ORIGIN_FIELDS = ("schedule_id", "pipeline_job_id", "pipeline_step", "idempotency_key")


def link(job: Job, origin: dict[str, Any] | None) -> None:
    """Set what started a job (a schedule, a pipeline's step) and the key that keeps it to one job."""
    for name, value in (origin or {}).items():
        assert name in ORIGIN_FIELDS, name
        setattr(job, name, value)
