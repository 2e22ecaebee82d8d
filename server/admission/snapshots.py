"""The last step of admitting any job that reads datasets: `validating -> queued` once every
snapshot still holds the bytes it was registered with.

Snapshots are read-only copies, so a mismatch means tampering or disk damage: the job fails rather
than train on data whose hash its lineage would misstate. Hashing a big snapshot takes seconds, so
it runs after the job's row and reservation are committed; a process that dies in between leaves
the job `validating`, and `recheck_stale` (run by the workers) finishes the check.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from server.admission.datasets import sha256_file
from server.store import reservations
from server.store.db import write_transaction
from server.store.tables import Dataset, Job, JobState


def queue_after_check(engine: Engine, job: Job, datasets: list[Dataset]) -> None:
    broken = [d for d in datasets if not _hash_matches(Path(d.path), d.content_hash)]
    if broken:
        _fail(engine, job, f"snapshot of {broken[0].id} no longer matches its hash; upload it again")
    else:
        _end_validation(engine, job, JobState.queued, None)


def recheck_stale(engine: Engine, stale_seconds: float) -> int:
    """Check the snapshots of jobs left `validating` by a process that died between inserting them
    and checking their datasets (one older than `stale_seconds` has no process left to finish it);
    the number checked."""
    with Session(engine) as session:
        stale = session.exec(select(Job).where(
            Job.state == JobState.validating, Job.created_at < time.time() - stale_seconds)).all()
        checks = [(job, {i: session.get(Dataset, i) for i in job.resolved.get("dataset_ids", [])}) for job in stale]
    for job, by_id in checks:
        missing = [i for i, d in by_id.items() if d is None]
        if missing:  # nothing deletes datasets; a row gone by hand must not leave the job training on the rest
            _fail(engine, job, f"dataset {missing[0]} no longer exists; launch the job again with the datasets "
                  "you have")
        else:
            queue_after_check(engine, job, [d for d in by_id.values() if d is not None])
    return len(checks)


def _fail(engine: Engine, job: Job, message: str) -> None:
    _end_validation(engine, job, JobState.failed, {"code": "invalid_dataset", "param": "datasets", "message": message})


def _end_validation(engine: Engine, job: Job, state: str, error: dict[str, Any] | None) -> None:
    with write_transaction(engine) as session:
        row = session.get(Job, job.id)
        assert row is not None
        if row.state != JobState.validating:  # checked already (see recheck_stale), maybe running
            job.state, job.error = row.state, row.error
            return
        row.state, row.error = state, error
        if state == JobState.failed:
            row.finished_at = time.time()
            reservations.settle(session, row.id, 0.0)
        session.add(row)
    job.state, job.error = row.state, row.error


def _hash_matches(path: Path, expected: str) -> bool:
    try:
        return sha256_file(path) == expected
    except OSError:
        return False
