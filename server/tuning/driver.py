"""The study driver: runs one `tune` job's Optuna study inside the service, its trials as train jobs.

The executor claims a tune job with the same lease as any job (owner, expiry, epoch as the fencing
token) and hands the lease to a `StudyDriver`, run in a thread instead of a child process: a study
trains nothing itself. The driver loops until the study ends:

- follow: relay each trial's held-out losses (`eval_loss` metrics events at its evaluation steps)
  to `trial.report(value, step)`, prune a trial when `trial.should_prune()` says so (its job is
  cancelled, keeps its record with `metrics.pruned`, and its unused reservation returns to the
  study), and `tell` Optuna how each finished trial ended;
- evaluate (KPI objective, `server/kpi_objective.py`): a trial whose training succeeded gets an
  eval job (kind `eval`, the trial's number, its reservation carved out of the study's); the trial
  holds its slot until that job ends, and Optuna is told the KPI's value from its report, or FAIL
  with the reason when the eval failed;
- start: `study.ask()` a new trial while fewer than `n_parallel` run, trials remain, and what is
  left of the study's budget pays for its costliest trial; the trial job is inserted with its
  Optuna trial number and its reservation carved out of the study's in one transaction;
- end: with nothing left to ask and nothing running, optionally retrain the best parameters on
  all the data (with a KPI objective, and evaluate the retrained model on the suite; trials that
  held nothing out need no retrain: the best one is the final model), then write the result (best
  parameters and value, best model, trials table, importances, `stopped_reason`) and settle the
  study's reservation against what its jobs used.

Restarts: the Optuna study lives in an RDB storage (`Settings.studies_url`) named after the job,
so a reclaimed study reloads it. A trial that Optuna shows running but that has no job was asked
by a driver that stopped before inserting the job: it never ran, so it is told FAIL and a new one
is asked in its place. Every other running trial has exactly one job, which the driver follows
again from its first event (Optuna ignores a step reported twice), and at most one eval job, found
again by its trial number. So no trial is lost, run twice or evaluated twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlmodel import Session, col, select

from server.admission import guardrails, snapshots
from server.admission.train import TrainRequest, build_train_job
from server.context import ServiceContext
from server.errors import WeightsmithError
from server.store import jobs
from server.store.db import without_password, write_transaction
from server.store.leases import Lease, LeaseKeeper
from server.store.tables import ACTIVE_STATES, FINAL_STATES, Agent, Job, JobState, Reservation
from server.tuning import kpi_objective
from server.tuning.admission import (
    ENDED_TRIAL_STATES,
    final_retrain_request,
    final_retrain_trains_more,
    objective_value,
    trial_request,
)
from server.tuning.kpi_objective import KpiObjective
from server.tuning.optuna_study import StudyStoreMoved, distributions, open_study, prunable

log = logging.getLogger("weightsmith.study")
optuna.logging.set_verbosity(optuna.logging.WARNING)

POLL_SECONDS = 0.5
MIN_TRIALS_FOR_IMPORTANCE = 4


class StudyDriver:
    """Drives one claimed tune job until it ends, its lease is lost, or the service stops."""

    def __init__(self, lease: Lease, job: Job, wake: Callable[[], None]):
        self.lease, self.job, self.wake = lease, job, wake
        """`wake` tells the workers a trial (or an eval) was just queued."""
        self.engine, self.settings, self.epoch = lease.engine, lease.settings, lease.epoch
        self.config = job.resolved
        self.kpi = KpiObjective(**job.resolved["kpi"]) if job.resolved.get("kpi") else None
        """Set for a KPI objective (studies admitted before KPI objectives have no `kpi` at all)."""
        self.eval_flops: float = job.resolved.get("eval_estimate_flops", 0.0)
        """What each trial's eval is priced at; 0 for the eval_loss objective."""
        self.final_is_best_trial = self.config["final_retrain"] and not final_retrain_trains_more(self._template())
        """A final retrain was asked for, but the trials held nothing out: the best trial is the final model."""
        self._reported: dict[str, int] = {}
        """Trial job id -> seq of the last metrics event relayed to Optuna."""
        self._written: dict[str, Any] = {}

    def flops_used(self) -> float:
        """What the study's jobs have used: recorded when the study is given back after an error."""
        return self._used()

    def run(self) -> None:
        try:
            study = open_study(self.job, self.settings.studies_url)
        except StudyStoreMoved as moved:
            self._fail(str(moved), "studies_database_url", "studies_database_moved")
            return
        space = distributions(self.config["search_space"])
        keeper = self.lease.keep_alive()
        try:
            self._drive(study, space, keeper)
        finally:
            keeper.stop()

    def _drive(self, study: optuna.Study, space: dict[str, Any], lease: LeaseKeeper) -> None:
        while True:
            if self.lease.stop_reason:
                lease.stop()  # before the hand-back, which a late renewal would undo
                self.lease.give_back(self.lease.stop_reason, flops_used=self._used(),
                                     run_seconds=self.job.run_seconds, handed_back=True)
                return
            if lease.lost.is_set():
                return  # another driver holds the study now: write nothing more
            rows = self._jobs()
            cancelling = jobs.cancel_requested(self.engine, self.job.id)
            if not self._follow(study, rows, cancelling):
                return
            rows = self._jobs()
            if cancelling:
                self._cancel(rows)
                if not any(r.state in ACTIVE_STATES for r in rows):
                    self._follow(study, rows, cancelling)  # a job that ended since the first read is told too
                    self._finish(study, rows, "cancelled")
                    return
            elif not self._advance(study, space, rows):
                return
            if not self._write_progress(study, self._jobs()):
                return
            time.sleep(POLL_SECONDS)

    # Following trials.

    def _jobs(self) -> list[Job]:
        """The study's jobs: its trials (train jobs with a trial number), their eval jobs (KPI
        objective: kind eval, the trial's number) and the final retrain (a train job without)."""
        with Session(self.engine) as session:
            return list(session.exec(select(Job).where(Job.study_job_id == self.job.id)
                                     .order_by(col(Job.created_at))))

    def _follow(self, study: optuna.Study, rows: list[Job], cancelling: bool) -> bool:
        """Relay, prune, evaluate and tell; False once the study has ended (an eval cannot be built)."""
        by_number = _trials(rows)
        evals = _evals(rows)
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            row = by_number.get(frozen.number)
            if row is None:  # asked by a driver that stopped before its job was inserted: it never ran
                study.tell(frozen.number, state=TrialState.FAIL)
                self._event(f"trial {frozen.number} was asked but never started (driver restart); asking anew")
                continue
            trial = optuna.trial.Trial(study, frozen._trial_id)
            step = self._report(trial, row, set(frozen.intermediate_values))
            if (step is not None and row.state == JobState.running
                    and prunable(step, row.resolved["hyperparameters"]) and trial.should_prune()):
                self._prune(row, step)
            if self.kpi is not None and row.state == JobState.succeeded:
                if not self._follow_eval(study, frozen.number, row, evals.get(frozen.number), cancelling):
                    return False
            elif row.state in FINAL_STATES:
                self._tell(study, frozen.number, row)
        return True

    def _report(self, trial: optuna.trial.Trial, row: Job, reported: set[int]) -> int | None:
        """Relay the trial's new held-out losses; the step of the newest, or None if none came.
        Steps Optuna has already (a driver before a restart; the loss after training repeats the last
        evaluation's step) are passed over."""
        newest = None
        while True:
            events = jobs.events(self.engine, row.agent_id, row.id, self._reported.get(row.id, 0), 500, ("metrics",))
            for event in events:
                value, step = event.data.get("eval_loss"), int(event.data.get("step") or 0)
                # Step 0 is the untrained model, the same for every trial.
                if value is not None and step > 0 and step not in reported and math.isfinite(value):
                    trial.report(float(value), step)
                    reported.add(step)
                    newest = step
            if events:
                self._reported[row.id] = events[-1].seq
            if len(events) < 500:
                return newest

    def _prune(self, row: Job, step: int) -> None:
        with write_transaction(self.engine) as session:
            job = session.get(Job, row.id)
            if job is None or job.state != JobState.running:
                return
            job.metrics = {**job.metrics, "pruned": True, "pruned_at_step": step}
            job.state, job.cancel_requested = JobState.cancelling, True
            jobs.append_event(session, job, "info", "message",
                               f"pruned by study {self.job.id} at step {step}: its held-out loss trails the "
                               "other trials'", {"pruned": True, "step": step})
            session.add(job)
        self._event(f"trial {row.trial_number} pruned at step {step}")
        self.wake()

    def _tell(self, study: optuna.Study, number: int, row: Job) -> None:
        value = objective_value(row.metrics) if row.state == JobState.succeeded else None
        if value is not None:
            self._tell_value(study, number, value)
        elif row.state == JobState.cancelled and row.metrics.get("pruned"):
            study.tell(number, state=TrialState.PRUNED)
        else:
            self._tell_failed(study, number, (row.error or {}).get("message") or "it reported no held-out loss")

    def _follow_eval(self, study: optuna.Study, number: int, row: Job, eval_row: Job | None,
                     cancelling: bool) -> bool:
        """A trained trial of a KPI study: start its eval, or tell Optuna the value its report gives."""
        assert self.kpi is not None
        if eval_row is None and cancelling:
            self._tell_failed(study, number, "the study was cancelled before its eval started")
        elif eval_row is None:
            return self._start_eval(study, number, row)
        elif eval_row.state in FINAL_STATES:
            value, why = kpi_objective.kpi_value(self.engine, eval_row, self.kpi.kpi)
            if value is None:
                self._tell_failed(study, number, why)
            else:
                self._tell_value(study, number, value)
        return True

    def _tell_value(self, study: optuna.Study, number: int, value: float) -> None:
        study.tell(number, value)
        self._event(f"trial {number} complete: {self.config['strategy']['objective']} {value:.4g}")

    def _tell_failed(self, study: optuna.Study, number: int, why: str) -> None:
        study.tell(number, state=TrialState.FAIL)
        self._event(f"trial {number} failed: {why}", level="warning")

    # Starting trials, and ending the study.

    def _advance(self, study: optuna.Study, space: dict[str, Any], rows: list[Job]) -> bool:
        """Start what may start; end the study when nothing is left. False once it has ended."""
        trials = list(_trials(rows).values())
        final = next((r for r in rows if r.kind == "train" and r.trial_number is None), None)
        # A trial holds its slot until Optuna is told how it ended: for a KPI objective, until its eval
        # ends too (its train job and its eval job never run at once).
        untold = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        running = sum(r.state in ACTIVE_STATES or r.trial_number in untold for r in trials)
        left = self._budget_left(rows)
        while (len(trials) < self.config["n_trials"] and running < self.config["n_parallel"]
               and left >= self.config["trial_estimate_flops"] + self.eval_flops):
            row = self._start_trial(study, space, left)
            if row is None:
                return False
            trials.append(row)
            running += 1
            left -= row.estimate_flops + self.eval_flops
        if running:
            return True
        stopped = "n_trials" if len(trials) >= self.config["n_trials"] else "budget_spent"
        best = _best(study)
        if self.final_is_best_trial and best is not None:
            self._event(f"no final retrain: the trials held nothing out (eval_fraction 0), so trial {best.number} "
                        "trained on all the data already; its model is the study's final model")
        elif self.config["final_retrain"] and best is not None:
            if final is None:
                final = self._start_final(best.params, left)
            if final is not None and final.state in ACTIVE_STATES:
                return True
            if self.kpi is not None and final is not None and final.state == JobState.succeeded:
                final_eval = _final_eval(rows) or self._start_final_eval(final, left)
                if final_eval is not None and final_eval.state in ACTIVE_STATES:
                    return True
        self._finish(study, self._jobs(), stopped)
        return False

    def _budget_left(self, rows: list[Job]) -> float:
        # An open trial holds its estimate (or more, if it somehow used more); a finished one what it used.
        held = sum(r.flops_used if r.state in FINAL_STATES else max(r.estimate_flops, r.flops_used) for r in rows)
        return self.config["budget_flops"] - held

    def _start_trial(self, study: optuna.Study, space: dict[str, Any], left: float) -> Job | None:
        trial = study.ask(space)
        request = trial_request(self._template(), trial.params).model_copy(
            update={"model_name": f"{self.job.id}-trial-{trial.number}"})
        # Held-out losses along the way feed the pruner; a KPI study has none, so its trials skip them.
        options = {} if self.kpi else {"eval_steps": self.config["eval_steps"]}
        # Its eval's share stays out of what the trial may spend, so the eval can always be paid for.
        row = self._insert(request, left - self.eval_flops, trial.number, options)
        if row is None:
            study.tell(trial, state=TrialState.FAIL)
            return None
        self._event(f"trial {trial.number} started as {row.id}", trial=trial.number, job_id=row.id,
                    params=trial.params)
        return row

    def _start_final(self, params: dict[str, Any], left: float) -> Job | None:
        request = final_retrain_request(self._template(), params).model_copy(
            update={"model_name": f"{self.job.id}-best"})
        # With a KPI objective its eval's share stays out of what it may spend, as for a trial.
        row = self._insert(request, left - self.eval_flops, None, {})
        if row is not None:
            self._event(f"final retrain on all the data started as {row.id}", job_id=row.id)
        return row

    def _start_final_eval(self, final: Job, left: float) -> Job | None:
        """Queue the eval of the final retrain's model on the study's suite (KPI objective), so the
        study reports the KPI of the model it hands over, not only of the trial it was retrained from;
        None if it cannot start (the study then ends without it, saying why)."""
        assert self.kpi is not None
        why = None
        if left < self.eval_flops:
            why = f"what is left of the study's budget ({left:.3g} FLOPs) does not pay for it ({self.eval_flops:.3g})"
        else:
            try:
                job, price = kpi_objective.trial_eval_job(self.engine, self.settings.runs_dir, self._agent(),
                                                          self.kpi, final, left)
            except WeightsmithError as err:
                why = err.message
        if why is not None:
            self._event(f"the final retrain's model is not evaluated: {why}; run run_eval on it", level="warning")
            return None
        if not self._insert_carved(job, price.flops):
            return None
        self._event(f"final retrain trained; its eval started as {job.id}", job_id=job.id)
        self.wake()
        return job

    def _insert(self, request: TrainRequest, left: float, number: int | None, options: dict[str, Any]) -> Job | None:
        """Insert a trial (or the final retrain) with its reservation carved out of the study's;
        None if it cannot be (the study then ends with the reason)."""
        # No executor here: the template's devices were checked when the study was admitted.
        ctx = ServiceContext(settings=self.settings, engine=self.engine)
        agent = self._agent()
        try:
            built = build_train_job(ctx, agent, request, extra_options=options)
            job, estimate = built.job, built.estimate
            guardrails.raise_if_refused(guardrails.check_request(agent, estimate), estimate)
        except WeightsmithError as err:
            self._fail(f"could not start {'trial ' + str(number) if number is not None else 'the final retrain'}: "
                       f"{err.message}", f"template.{err.param}" if err.param else "template")
            return None
        if number is None and estimate.flops > left:  # a trial always fits: the study is priced at its costliest
            self._event(f"the final retrain ({estimate.flops:.3g} FLOPs) does not fit what is left of the "
                        f"study's budget ({left:.3g}); skipped", level="warning")
            return None
        job.study_job_id, job.trial_number = self.job.id, number
        limits = job.resolved["spec"]["limits"]
        limits["max_flops"] = min(limits["max_flops"], left)  # a trial can never spend past the study's budget
        if not self._insert_carved(job, estimate.flops):
            return None
        snapshots.queue_after_check(self.engine, job, built.datasets)
        self.wake()
        return job

    def _start_eval(self, study: optuna.Study, number: int, row: Job) -> bool:
        """Queue the eval of a trained trial (KPI objective); False once the study has ended."""
        assert self.kpi is not None
        left = self._budget_left(self._jobs())
        if left < self.eval_flops:  # trials are capped to leave their eval's share; parallel ones may overrun
            self._tell_failed(study, number, f"what is left of the study's budget ({left:.3g} FLOPs) does not pay "
                                             f"for its eval ({self.eval_flops:.3g})")
            return True
        try:
            job, price = kpi_objective.trial_eval_job(self.engine, self.settings.runs_dir, self._agent(), self.kpi,
                                                      row, left)
        except WeightsmithError as err:  # every trial's eval would fail alike (the suite's data, the limits)
            self._fail(f"could not start the eval of trial {number}: {err.message}", "strategy.objective")
            return False
        if not self._insert_carved(job, price.flops):
            return False
        self._event(f"trial {number} trained; its eval started as {job.id}", trial=number, job_id=job.id)
        self.wake()
        return True

    def _insert_carved(self, job: Job, flops: float) -> bool:
        """Insert a job of the study with its reservation carved out of the study's; False when this
        driver no longer holds the study."""
        with write_transaction(self.engine) as session:
            study_row = session.get(Job, self.job.id)
            if study_row is None or study_row.lease_epoch != self.epoch:
                return False
            session.add(job)
            session.flush()
            session.add(Reservation(agent_id=job.agent_id, job_id=job.id, flops_reserved=flops,
                                    within_job_id=self.job.id))
        return True

    def _cancel(self, rows: list[Job]) -> None:
        for row in rows:
            if row.state in (JobState.validating, JobState.queued, JobState.running):
                jobs.request_cancel(self.engine, row.agent_id, row.id)
        self.wake()

    def _finish(self, study: optuna.Study, rows: list[Job], stopped: str) -> None:
        result = self._result(study, rows, final=True)
        result["stopped_reason"] = stopped
        used = sum(r.flops_used for r in rows)
        best_model = result.get("final_model_id") or result.get("best_model_id")
        jobs.relay(self.engine, self.job.id, self.epoch, [], 0, {"flops_used": used, "model_id": best_model})
        error = None
        if stopped == "cancelled":
            state = JobState.cancelled
            error = {"code": "cancelled", "param": None,
                     "message": f"study cancelled after {len(result['trials'])} trials; metrics hold its best so far"}
        elif "best_value" not in result:
            state = JobState.failed
            error = {"code": "no_trial_completed", "param": "search_space",
                     "message": f"none of the {len(result['trials'])} trials completed (see metrics.trials and the "
                                "trial jobs' errors); narrow the search space or raise the budget"}
        else:
            state = JobState.succeeded
        jobs.finish(self.engine, self.job.id, self.epoch, state, error=error, metrics=result)

    def _fail(self, message: str, param: str, code: str = "trial_not_started") -> None:
        """End the study at once: a trial or its eval cannot be built (a dataset or model is gone,
        limits changed), or its Optuna study is not in the service's studies database."""
        rows = self._jobs()
        self._cancel(rows)
        jobs.relay(self.engine, self.job.id, self.epoch, [], 0, {"flops_used": sum(r.flops_used for r in rows)})
        jobs.finish(self.engine, self.job.id, self.epoch, JobState.failed,
                    error={"code": code, "message": message, "param": param})

    # The result.

    def _result(self, study: optuna.Study, rows: list[Job], final: bool = False) -> dict[str, Any]:
        by_number = _trials(rows)
        evals = _evals(rows)
        table = []
        for frozen in study.get_trials(deepcopy=False):
            row = by_number.get(frozen.number)
            if row is None:
                continue  # asked but never started (see _follow): not a trial of this study
            eval_row = evals.get(frozen.number)
            state = frozen.state.name.lower()
            if frozen.state == TrialState.RUNNING:
                state = "evaluating" if self.kpi and row.state == JobState.succeeded else row.state
            trial = {"number": frozen.number, "job_id": row.id, "state": state, "value": frozen.value,
                     "params": frozen.params, "flops_used": row.flops_used + (eval_row.flops_used if eval_row else 0.0),
                     "step": row.metrics.get("pruned_at_step") or row.progress.get("step")}
            if self.kpi:  # value is the KPI's, from this job's report
                trial["eval_job_id"] = eval_row.id if eval_row else None
            table.append(trial)
        result: dict[str, Any] = {
            "objective": self.config["strategy"]["objective"], "direction": self.config["strategy"]["direction"],
            "budget_flops": self.config["budget_flops"], "flops_used": sum(r.flops_used for r in rows),
            "trials_complete": sum(t["state"] == "complete" for t in table),
            "trials_pruned": sum(t["state"] == "pruned" for t in table),
            "trials_failed": sum(t["state"] == "fail" for t in table), "trials": table,
            # By default the service's own database: its password must not reach the agent.
            "dashboard": f"optuna-dashboard {without_password(self.config['studies_url'])}"}
        best = _best(study)
        if best is not None:
            row = by_number[best.number]
            result.update(best_value=best.value, best_params=best.params, best_trial=best.number,
                          best_job_id=row.id, best_model_id=row.model_id)
        final_row = next((r for r in rows if r.kind == "train" and r.trial_number is None), None)
        if final_row is not None:
            result.update(final_job_id=final_row.id, final_model_id=final_row.model_id)
        final_eval = _final_eval(rows)
        if final_eval is not None and self.kpi is not None:
            result["final_eval_job_id"] = final_eval.id
            if final_eval.state in FINAL_STATES:
                value, why = kpi_objective.kpi_value(self.engine, final_eval, self.kpi.kpi)
                result.update(final_value=value, **({"final_eval_error": why} if value is None else {}))
        if self.final_is_best_trial and best is not None:
            result.update(final_job_id=result["best_job_id"], final_model_id=result["best_model_id"])
        if final and result["trials_complete"] >= MIN_TRIALS_FOR_IMPORTANCE:
            result["importances"] = optuna.importance.get_param_importances(study)
        return result

    def _write_progress(self, study: optuna.Study, rows: list[Job]) -> bool:
        """Keep get_job's view of the study current; False when the lease is lost."""
        result = self._result(study, rows)
        if result == self._written:
            return True
        self._written = result
        done = sum(t["state"] in ENDED_TRIAL_STATES for t in result["trials"])
        progress = {"step": done, "max_steps": self.config["n_trials"], "loss": result.get("best_value")}
        return jobs.relay(self.engine, self.job.id, self.epoch, [], 0, {
            "metrics": result, "progress": progress, "flops_used": result["flops_used"]}) is not None

    # Small helpers.

    def _template(self) -> TrainRequest:
        return TrainRequest.model_validate(self.config["template"])

    def _used(self) -> float:
        return sum(r.flops_used for r in self._jobs())

    def _agent(self) -> Agent:
        with Session(self.engine) as session:
            agent = session.get(Agent, self.job.agent_id)
            assert agent is not None
            return agent

    def _event(self, message: str, level: str = "info", **data: Any) -> None:
        jobs.relay(self.engine, self.job.id, self.epoch,
                   [{"type": "message", "level": level, "message": message, "data": data}], 0)



def _trials(rows: list[Job]) -> dict[int, Job]:
    """Trial number -> the trial's train job."""
    return {r.trial_number: r for r in rows if r.kind == "train" and r.trial_number is not None}


def _final_eval(rows: list[Job]) -> Job | None:
    """The final retrain's eval job (KPI objective): an eval job of the study without a trial number."""
    return next((r for r in rows if r.kind == "eval" and r.trial_number is None), None)


def _evals(rows: list[Job]) -> dict[int, Job]:
    """Trial number -> the trial's eval job (KPI objective)."""
    return {r.trial_number: r for r in rows if r.kind == "eval" and r.trial_number is not None}


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return study.best_trial
