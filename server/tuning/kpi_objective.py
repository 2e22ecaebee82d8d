"""A study's eval-suite KPI objective (`strategy.objective = "kpi:SUITE/KPI"`): which suite and KPI,
the eval job each trial gets once its training succeeds, and the KPI value read from its report.

The tool resolves the objective at admission (`resolve`, `eval_price`); the study driver
(`server/study.py`) builds each trial's eval job here (`trial_eval_job`) and inserts it with its
reservation carved out of the study's, as it does the trial itself, then tells Optuna the value
`kpi_value` reads from the candidate's EvalReport.

A study compares its trials with one another, never with a baseline: a trial's eval runs the
candidate alone (`queue_eval` runs a baseline only when it is given one), so each trial pays for one
model's eval and its report carries no gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server.admission import guardrails
from server.errors import InvalidRequest
from server.evaluation import jobs as eval_jobs
from server.evaluation.suites import owned_suite
from server.evaluation.targets import target_for_model
from server.store.tables import Agent, EvalReport, EvalSuite, Job, JobState, Model

PREFIX = "kpi:"
COMPOSITE = "composite"
"""`kpi:SUITE/composite`: the suite's composite (its formula, or the weighted mean of its KPIs where
higher is better; `training_core.suite.composite_value`), a score to maximize, unless a KPI has the name."""
LISTED_SUITES = 10
OPTUNA_DIRECTION = {"higher": "maximize", "lower": "minimize"}


@dataclass(frozen=True)
class KpiObjective:
    """The suite (pinned by id: a later suite of the same name does not change a running study) and KPI."""

    suite_id: str
    suite: str
    kpi: str
    direction: str
    """The study's Optuna direction: the KPI's own (higher -> maximize, lower -> minimize)."""

    @property
    def objective(self) -> str:
        return f"{PREFIX}{self.suite_id}/{self.kpi}"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve(session: Session, agent_id: str, objective: str) -> KpiObjective:
    """`kpi:SUITE/KPI` with SUITE one of the agent's suites (id or name) and KPI one of its KPIs."""
    suite_ref, _, kpi_name = objective.removeprefix(PREFIX).rpartition("/")
    if not suite_ref or not kpi_name:
        raise InvalidRequest(f"objective {objective!r} is not kpi:SUITE/KPI (SUITE an eval suite id or name, "
                             "KPI one of its KPIs' names)", param="strategy.objective")
    suite_row = _suite(session, agent_id, suite_ref)
    kpis = {kpi["name"]: kpi for kpi in suite_row.definition["kpis"]}
    composite = _has_composite(suite_row.definition)
    if kpi_name == COMPOSITE and kpi_name not in kpis:
        if not composite:
            raise InvalidRequest(f"suite {suite_row.name} ({suite_row.id}) has no composite: no formula, and none of "
                                 f"its KPIs ({', '.join(kpis)}) is one where higher is better with a weight; name "
                                 "one of them, or declare the suite again with a composite formula",
                                 param="strategy.objective")
        return KpiObjective(suite_id=suite_row.id, suite=suite_row.name, kpi=COMPOSITE, direction="maximize")
    if kpi_name not in kpis:
        raise InvalidRequest(f"suite {suite_row.name} ({suite_row.id}) has no KPI {kpi_name!r}; its KPIs: "
                             f"{', '.join(kpis)}" + (f"; or its {COMPOSITE}" if composite else ""),
                             param="strategy.objective")
    return KpiObjective(suite_id=suite_row.id, suite=suite_row.name, kpi=kpi_name,
                        direction=OPTUNA_DIRECTION[kpis[kpi_name]["direction"]])


def _has_composite(definition: dict[str, Any]) -> bool:
    """Whether the suite's reports give a composite (`training_core.suite.composite_value`)."""
    return bool(definition.get("composite")) or any(
        kpi.get("direction", "higher") == "higher" and kpi.get("weight", 1.0) for kpi in definition["kpis"])


def _suite(session: Session, agent_id: str, ref: str) -> EvalSuite:
    by_id = session.get(EvalSuite, ref)
    if by_id is not None and by_id.agent_id == agent_id:
        return by_id
    named = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id, EvalSuite.name == ref)
                         .order_by(col(EvalSuite.created_at).desc())).all()
    if len(named) == 1:
        return named[0]
    if named:  # the same name over other data or KPIs: which one the study means is the agent's call
        raise InvalidRequest(f"{len(named)} of your suites are named {ref!r} ({', '.join(s.id for s in named)}); "
                             "name one by its id: kpi:SUITE_ID/KPI", param="strategy.objective")
    yours = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id)
                         .order_by(col(EvalSuite.created_at).desc()).limit(LISTED_SUITES)).all()
    listed = "; ".join(f"{s.name} ({s.id}): {', '.join(k['name'] for k in s.definition['kpis'])}" for s in yours)
    raise InvalidRequest(f"no eval suite {ref!r} of yours; " + (
        f"your suites and their KPIs: {listed}" if yours else "you have none: declare one with create_eval_suite"),
        param="strategy.objective")


def eval_price(engine: Engine, suite_id: str, parameters: int) -> guardrails.Estimate:
    """What one trial's eval costs: the candidate alone, a model of `parameters` (every trial of a
    study has its template's parameter count: a search space changes hyperparameters, not the model)."""
    with Session(engine) as session:
        suite_row = session.get(EvalSuite, suite_id)
    assert suite_row is not None
    return eval_jobs.estimate(engine, suite_row, [parameters], None)


def trial_eval_job(engine: Engine, runs_dir: Path, agent: Agent, objective: KpiObjective, trial: Job,
                   max_flops: float) -> tuple[Job, guardrails.Estimate]:
    """The unsaved eval job of a trial whose training succeeded (or of the study's final retrain:
    no trial number), linked to its study and trial, its compute capped at `max_flops` (what is left
    of the study's budget); the caller inserts it."""
    with Session(engine) as session:
        suite_row = owned_suite(session, agent.id, objective.suite_id, "strategy.objective")
        model = session.get(Model, trial.model_id)
        assert model is not None, f"succeeded trial {trial.id} has no model"
        candidate = target_for_model(session, model)
    job, price = eval_jobs.prepare_eval_job(engine, runs_dir, agent, suite_row, candidate, None, request={
        "model": model.id, "suite_id": suite_row.id, "study_job_id": trial.study_job_id,
        "trial": trial.trial_number})
    guardrails.raise_if_refused(guardrails.check_request(agent, price), price)
    job.study_job_id, job.trial_number = trial.study_job_id, trial.trial_number
    limits = job.resolved["spec"]["limits"]
    limits["max_flops"] = min(limits["max_flops"], max_flops)
    return job, price


def kpi_value(engine: Engine, eval_job: Job, kpi: str) -> tuple[float | None, str]:
    """The KPI's value in the candidate's report of a finished eval job, or None and why there is none."""
    if eval_job.state != JobState.succeeded:
        why = (eval_job.error or {}).get("message") or "no reason recorded"
        return None, f"its eval job {eval_job.id} {eval_job.state}: {why}"
    with Session(engine) as session:
        report = session.get(EvalReport, eval_job.metrics["report_id"])
    assert report is not None, f"succeeded eval job {eval_job.id} has no report"
    rows = {row["name"]: row["value"] for row in report.summary["kpis"]}
    value = rows[kpi] if kpi in rows else report.summary.get(COMPOSITE)  # a KPI's own name comes first
    if value is None or not math.isfinite(value):
        return None, f"its eval report {report.id} gives {kpi} = {value}, which cannot be compared"
    return float(value), ""
