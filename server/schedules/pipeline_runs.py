"""A pipeline run: a `pipeline` job whose steps are ordinary jobs linked to it, run one after another.

The executor claims a pipeline job with the same lease as any job and hands it to a `PipelineDriver`
(a thread, like a study's driver: a pipeline trains nothing itself). The driver works through the
steps in order:

- a step whose condition (`when`) does not hold on the earlier steps' outputs ends the run there,
  with the reason; the run has succeeded, promoting nothing;
- a synth, train, tune or eval step starts its job as the agent's own call would (admitted against
  its limits: a refusal ends the run as failed, with the reason), keyed `pipeline:JOB:STEP`, then
  waits for it; a step job that fails ends the run as failed;
- a promote step moves the alias then and there, recorded as moved by this run.

Restarts: each step's job is found again by its key, so a driver that takes over a run follows the
step that was running and starts none twice; the steps' outputs are kept in the run's metrics.
Every write carries the lease's epoch, so a driver whose lease was taken over writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlmodel import Session, select

from server.context import ServiceContext
from server.errors import InvalidRequest, LimitExceeded, WeightsmithError
from server.schedules import outputs, pipelines, work
from server.schedules.definitions import TRIGGER_OUTPUTS, PromoteRequest
from server.store import aliases, jobs, reservations
from server.store.db import write_transaction
from server.store.leases import Lease
from server.store.tables import ACTIVE_STATES, FINAL_STATES, Agent, Job, JobState

log = logging.getLogger("weightsmith.pipelines")
POLL_SECONDS = 0.5


def admit_pipeline(ctx: ServiceContext, agent: Agent, request: dict[str, Any], trigger: dict[str, Any], *,
                   key: str, schedule_id: str | None) -> Job:
    """Queue a pipeline run; each step is admitted when it starts. The run itself holds one of the
    agent's concurrent jobs, and no compute."""
    pipelines.parse_pipeline(request, "request", {"trigger": TRIGGER_OUTPUTS})
    with write_transaction(ctx.engine) as session:
        existing = session.exec(select(Job).where(Job.agent_id == agent.id, Job.idempotency_key == key)).first()
        if existing is not None:
            return existing
        locked = reservations.lock_agent(session, ctx.engine, agent.id)
        active = reservations.active_job_count(session, locked)
        if active >= locked.max_concurrent_jobs:
            raise LimitExceeded(f"you have {active} active jobs and may run {locked.max_concurrent_jobs} at once: "
                                "wait for one to finish or cancel one", param="max_concurrent_jobs")
        job = Job(agent_id=agent.id, kind="pipeline", method="pipeline", state=JobState.queued, request=request,
                  idempotency_key=key, schedule_id=schedule_id,
                  resolved={"pipeline": request, "trigger": trigger, "steps": [s["name"] for s in request["steps"]]})
        session.add(job)
    ctx.wake_workers()
    return job


class PipelineDriver:
    """Runs one claimed pipeline job until it ends, its lease is lost, or the service stops."""

    def __init__(self, lease: Lease, job: Job, wake: Callable[[], None]):
        self.lease, self.job, self.wake = lease, job, wake
        self.engine, self.settings, self.epoch = lease.engine, lease.settings, lease.epoch
        self.pipeline = pipelines.parse_pipeline(job.resolved["pipeline"], "request", {"trigger": TRIGGER_OUTPUTS})
        self.given = {"trigger": TRIGGER_OUTPUTS}
        self.done: dict[str, Any] = dict(job.metrics.get("outputs") or {})
        """Step name -> its outputs, for the steps that have ended."""

    def run(self) -> None:
        keeper = self.lease.keep_alive()
        try:
            self._drive(keeper)
        finally:
            keeper.stop()

    def _drive(self, keeper: Any) -> None:
        for index, step in enumerate(self.pipeline.steps):
            if step.name in self.done:
                continue
            context = {"trigger": self.job.resolved.get("trigger") or {}, **self.done}
            condition = pipelines.step_condition(self.pipeline, index, self.given)
            if condition is not None:
                verdict = condition.check(context)
                if not verdict.held:
                    self._end(JobState.succeeded, f"stopped before step {step.name}: {verdict.reason}")
                    return
            try:
                request = pipelines.resolve_request(step, context, f"request.steps[{index}].request")
                if step.kind == "promote":
                    self._record(step.name, self._promote(request))
                    continue
                job = self._start(step.name, step.kind, request)
            except WeightsmithError as err:
                self._end(JobState.failed, f"step {step.name} could not start: {err}", code=err.code)
                return
            ended = self._follow(job, keeper)
            if ended is None:
                return  # the service is stopping, the lease was lost, or the run was cancelled
            if ended.state != JobState.succeeded:
                why = (ended.error or {}).get("message") or ended.state
                self._end(JobState.failed, f"step {step.name} ({ended.id}) {ended.state}: {why}", code="step_failed")
                return
            self._record(step.name, outputs.of_job(self.engine, ended))
        self._end(JobState.succeeded, "every step ran")

    def _start(self, name: str, kind: str, request: dict[str, Any]) -> Job:
        agent = self._agent()
        ctx = ServiceContext(settings=self.settings, engine=self.engine)
        job = work.start(ctx, agent, kind, request, key=f"pipeline:{self.job.id}:{name}",
                         origin={"pipeline_job_id": self.job.id, "pipeline_step": name,
                                 "schedule_id": self.job.schedule_id})
        self._event(f"step {name}: {kind} job {job.id} started", step=name, job_id=job.id)
        self.wake()
        return job

    def _follow(self, step_job: Job, keeper: Any) -> Job | None:
        while True:
            if self.lease.stop_reason:
                keeper.stop()  # before the hand-back, which a late renewal would undo
                self.lease.give_back(self.lease.stop_reason, flops_used=None, run_seconds=0.0, handed_back=True)
                return None
            if keeper.lost.is_set():
                return None
            if jobs.cancel_requested(self.engine, self.job.id):
                if step_job.state in ACTIVE_STATES:
                    jobs.request_cancel(self.engine, step_job.agent_id, step_job.id)
                    self.wake()
                self._end(JobState.cancelled, f"cancelled while step {step_job.pipeline_step} ran", code="cancelled")
                return None
            with Session(self.engine) as session:
                current = session.get(Job, step_job.id)
            assert current is not None
            if current.state in FINAL_STATES:
                return current
            time.sleep(POLL_SECONDS)

    def _promote(self, request: dict[str, Any]) -> dict[str, Any]:
        promote = PromoteRequest.model_validate(request)
        with Session(self.engine) as session:
            model = aliases.resolve_model(session, self.job.agent_id, promote.model, "model")
        if model is None:
            raise InvalidRequest(f"{promote.model!r} is not a model id", param="model")
        with Session(self.engine) as session:
            current = aliases.of_agent(session, self.job.agent_id).get(promote.alias)
        if current != model.id:  # a restart after the move does not move it twice
            aliases.promote(self.engine, self.job.agent_id, promote.alias, model.id, report_id=promote.report_id,
                            moved_by=f"pipeline {self.job.id}", reason="pipeline promote step")
        self._event(f"promoted {model.id} to {promote.alias}", alias=promote.alias, model_id=model.id)
        return {"alias": promote.alias, "model_id": model.id}

    def _record(self, name: str, made: dict[str, Any]) -> None:
        self.done[name] = made
        jobs.relay(self.engine, self.job.id, self.epoch, [], 0, {"metrics": {"outputs": self.done}})

    def _end(self, state: str, outcome: str, code: str | None = None) -> None:
        promoted = [o["model_id"] for name, o in self.done.items()
                    if any(s.name == name and s.kind == "promote" for s in self.pipeline.steps)]
        models = [o.get("model_id") for o in self.done.values() if o.get("model_id")]
        metrics = {"outputs": self.done, "outcome": outcome, "promoted": bool(promoted),
                   "model_id": promoted[-1] if promoted else (models[-1] if models else None)}
        error = None if state == JobState.succeeded else {"code": code or state, "message": outcome, "param": None}
        self._event(outcome)
        jobs.finish(self.engine, self.job.id, self.epoch, state, error=error, metrics=metrics)

    def _agent(self) -> Agent:
        with Session(self.engine) as session:
            agent = session.get(Agent, self.job.agent_id)
        assert agent is not None
        return agent

    def _event(self, message: str, **data: Any) -> None:
        jobs.relay(self.engine, self.job.id, self.epoch, [{"type": "message", "message": message, "data": data}], 0)
