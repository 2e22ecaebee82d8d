"""The job store's tables (SQLModel). Times are UNIX seconds (float): cheap to compare in SQL
on SQLite and PostgreSQL alike, and turned into ISO strings only at the edges.

Schema changes go through alembic (`server/migrations`); add a revision with every change here.
"""

from __future__ import annotations

import enum
import secrets
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class JobState(enum.StrEnum):
    validating = "validating"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = (JobState.validating, JobState.queued, JobState.running, JobState.cancelling)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled)


class Agent(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("agt"), primary_key=True)
    name: str = Field(unique=True, index=True)
    key_hash: str | None = Field(default=None, unique=True, index=True)
    """SHA-256 of the API key; the key itself is shown once and never stored. None once revoked."""
    revoked_at: float | None = None
    """When the agent's key was revoked (`weightsmith agents revoke`); a new one can be issued."""
    created_at: float = Field(default_factory=time.time)
    max_request_flops: float
    max_request_seconds: float
    max_request_params: int = Field(sa_type=BigInteger)
    max_request_tokens: int = Field(sa_type=BigInteger)
    max_dataset_bytes: int = Field(sa_type=BigInteger)
    budget_flops: float
    budget_window_seconds: float
    max_concurrent_jobs: int


class Dataset(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("agent_id", "content_hash"),)
    id: str = Field(default_factory=lambda: new_id("ds"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    name: str
    content_hash: str
    """sha256 of the snapshot's bytes: what a job trained on, whatever later happens to the source."""
    path: str
    """The immutable snapshot under HOME/datasets."""
    source: str
    """`upload` or the path it was registered from."""
    file_type: str
    format: str | None = None
    records: int = 0
    bytes: int = Field(default=0, sa_type=BigInteger)
    valid: bool = False
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    lineage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    """How a generated dataset was made (synth job, task, generator, seed, sources by hash); None for uploads."""
    created_at: float = Field(default_factory=time.time)


class Job(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("agent_id", "idempotency_key"),)
    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    kind: str = "train"
    method: str = "sft"
    state: str = Field(default=JobState.queued, index=True)
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    """The request as the agent sent it."""
    resolved: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    """Everything `auto` resolved, the estimate, and the paths: what the child ran."""
    idempotency_key: str | None = None
    request_hash: str = ""
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    """The latest metrics event: step, max_steps, loss, tokens_per_second, eta_seconds."""
    estimate_flops: float = 0.0
    run_dir: str = ""
    output_dir: str = ""
    model_id: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    handed_back: int = 0
    """Runs given back because the service stopped cleanly: unlike crashes, they do not count
    towards `Settings.max_attempts` (a long job or study outlives many restarts)."""
    lease_owner: str | None = None
    lease_expires_at: float | None = Field(default=None, index=True)
    lease_epoch: int = 0
    """Fencing token: every claim bumps it, and a worker's writes carry the epoch they claimed with."""
    event_seq: int = 0
    events_offset: int = 0
    """Bytes of the child's events.jsonl already relayed, so a resumed job never relays twice."""
    flops_used: float = 0.0
    """Compute used over every run of the job, resumed ones included; what settlement charges."""
    run_seconds: float = 0.0
    """Wall-clock seconds the job has run over all its runs; the wall-clock cap counts these."""
    created_at: float = Field(default_factory=time.time, index=True)
    started_at: float | None = None
    finished_at: float | None = None
    study_job_id: str | None = Field(default=None, index=True)
    """For a trial (or the final retrain) of a study: the `tune` job it belongs to."""
    trial_number: int | None = None
    """The Optuna trial this job runs, written with the job: after a restart each trial maps to one job."""
    pipeline_job_id: str | None = Field(default=None, index=True)
    """For a step of a pipeline run: the `pipeline` job it belongs to."""
    pipeline_step: str | None = None
    """The step's name: after a restart each step maps to at most one job."""
    schedule_id: str | None = Field(default=None, index=True)
    """The schedule whose firing started this job, if one did."""


class JobEvent(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("job_id", "seq"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", index=True)
    seq: int
    time: float
    level: str = "info"
    type: str = "message"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Checkpoint(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", index=True)
    step: int
    path: str
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: float = Field(default_factory=time.time)


class Model(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("mdl"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    name: str
    path: str
    """A Hugging Face directory: full weights, or the adapter when `adapter` is `lora`."""
    merged_path: str | None = None
    adapter: str = "full"
    base_model: str = ""
    """Parent model id, or the local directory the job started from."""
    parent_model_id: str | None = None
    job_id: str | None = Field(default=None, foreign_key="job.id")
    dataset_hashes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    parameters: int = Field(default=0, sa_type=BigInteger)
    created_at: float = Field(default_factory=time.time)


class Reservation(SQLModel, table=True):
    """Compute held for a job from admission until it is settled, exactly once, against use."""

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    job_id: str = Field(foreign_key="job.id", unique=True)
    flops_reserved: float
    flops_used: float | None = None
    settled_at: float | None = None
    created_at: float = Field(default_factory=time.time, index=True)
    within_job_id: str | None = None
    """Set on a study's trial: its compute is carved out of the study's reservation (that job's id),
    which alone is charged to the agent's budget."""


class EvalSuite(SQLModel, table=True):
    """A declared eval suite (see `training_core.suite`): the same definition is stored once per agent."""

    __table_args__ = (UniqueConstraint("agent_id", "content_hash"),)
    id: str = Field(default_factory=lambda: new_id("suite"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    name: str
    definition: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    dataset_id: str = Field(foreign_key="dataset.id")
    content_hash: str
    """sha256 of the canonical definition and the dataset's content hash: reports are comparable
    only within one hash."""
    items: int = 0
    created_at: float = Field(default_factory=time.time)


class EvalReport(SQLModel, table=True):
    """One model's scores on one suite, with the gate against its baseline and drift findings."""

    id: str = Field(default_factory=lambda: new_id("rep"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    job_id: str = Field(foreign_key="job.id", index=True)
    suite_id: str = Field(foreign_key="evalsuite.id", index=True)
    model_ref: str = Field(index=True)
    """The model evaluated: a registered model id, or the local directory of an unregistered one."""
    model_id: str | None = Field(default=None, foreign_key="model.id", index=True)
    model_family: str = Field(index=True)
    """The root of the model's lineage (the first base model): KPI drift compares a family's reports."""
    baseline_ref: str | None = None
    baseline_report_id: str | None = None
    verdict: str = "inconclusive"
    """`pass`, `fail` or `inconclusive`: thresholds and, with a baseline, the regression gate."""
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    """KPI values, the gate per KPI, the composite, drift findings, decoding settings."""
    results_path: str = ""
    """Per-item prompts, references, outputs and scores (JSONL) under HOME/runs."""
    created_at: float = Field(default_factory=time.time, index=True)


class Alias(SQLModel, table=True):
    """A name an agent gives one of its models (`production`, `staging`, ...): `alias:NAME` is accepted
    wherever a model id is. Moving it is a promotion, recorded in `AliasEvent`."""

    __table_args__ = (UniqueConstraint("agent_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    name: str
    model_id: str = Field(foreign_key="model.id")
    updated_at: float = Field(default_factory=time.time)


class AliasEvent(SQLModel, table=True):
    """One move of an alias: who moved it, when, from which model to which, on which eval report."""

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    alias: str = Field(index=True)
    action: str = "promote"
    """`promote` or `rollback`."""
    model_id: str
    previous_model_id: str | None = None
    report_id: str | None = None
    moved_by: str = ""
    """The agent's name, or the schedule or pipeline job that moved it."""
    reason: str = ""
    created_at: float = Field(default_factory=time.time, index=True)


class Schedule(SQLModel, table=True):
    """Work that starts on its own: a trigger, the policies it fires under, and what each firing starts
    (`kind` and `request`, as the tool of that kind takes it; a pipeline's steps)."""

    __table_args__ = (UniqueConstraint("agent_id", "name"),)
    id: str = Field(default_factory=lambda: new_id("sch"), primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    name: str
    kind: str
    """train, tune, synth, eval or pipeline."""
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    trigger: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    policies: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    budget_flops: float | None = None
    """The schedule's own compute budget per `budget_window_seconds`, under the agent's."""
    budget_window_seconds: float = 86400.0
    state: str = Field(default="active", index=True)
    """active, paused or ended."""
    state_reason: str = ""
    consecutive_failures: int = 0
    runs: int = 0
    """Firings that started work."""
    last_fire_at: float
    """The latest fire time handled (the creation time before the first)."""
    next_fire_at: float | None = Field(default=None, index=True)
    """When the scheduler looks at it next: the next fire time (with jitter); None for event triggers."""
    buffered_fire_at: float | None = None
    """A firing held back (overlap buffer_one) until the running one ends."""
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    created_at: float = Field(default_factory=time.time)


class ScheduleRun(SQLModel, table=True):
    """One firing of a schedule: at most one per fire time, whichever service process saw it first."""

    __table_args__ = (UniqueConstraint("schedule_id", "fire_time"),)
    id: int | None = Field(default=None, primary_key=True)
    schedule_id: str = Field(foreign_key="schedule.id", index=True)
    fire_time: float
    """The nominal fire time (UNIX seconds), or the time of the event that fired it."""
    state: str = "started"
    """started (its job runs), succeeded, failed, refused (not admitted), skipped (overlap), buffered."""
    job_id: str | None = None
    reason: str = ""
    created_at: float = Field(default_factory=time.time)


class Usage(SQLModel, table=True):
    """Compute an agent spent outside jobs: serving its models (2 x parameters x tokens a request).
    It counts in the rolling budget like a job's settled reservation."""

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    kind: str = "serve"
    model_id: str | None = None
    tokens: int = Field(default=0, sa_type=BigInteger)
    flops: float = 0.0
    created_at: float = Field(default_factory=time.time, index=True)
