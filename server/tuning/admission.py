"""Admitting a study (`tune` job): an Optuna study over a train request, whose trials are ordinary
train jobs.

The study is a `tune` job. Its whole budget is reserved when it is admitted, in the same
transaction that inserts it (the given `budget_flops`, or `n_trials` times the estimate of the
costliest trial the search space allows, and the final retrain when one is asked for); its trials'
compute is carved out of that reservation, so the agent is charged once. A study driver in the
executor (`server/tuning/driver.py`) then asks Optuna for trials, runs each as a train job and prunes the
ones falling behind.

The objective is the trial's held-out loss, or a KPI of one of the agent's eval suites
(`kpi:SUITE/KPI`, see `server/tuning/kpi_objective.py`): each trial is then evaluated on the suite once it
has trained, within the study's budget (each trial is priced with its eval), and the direction is
the KPI's own. Trials report only their held-out loss while they train, which is not the KPI, so a
KPI study does not prune.

Parameter names in the search space are the `hyperparameters` fields of a train request
(`learning_rate`, `max_steps`, `warmup_ratio`, ...) or `lora.<field>` (`lora.r`, `lora.alpha`,
`lora.dropout`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, ValidationError
from sqlmodel import Session

from server.admission import guardrails, idempotency
from server.admission.requests import RequestModel
from server.admission.train import Hyperparameters, LoraOptions, TrainRequest, build_train_job
from server.context import ServiceContext
from server.errors import InvalidRequest, LimitExceeded, WeightsmithError, problems_of
from server.store import reservations
from server.store.db import without_password, write_transaction
from server.store.tables import Agent, Job, JobState, Reservation
from server.tuning import kpi_objective
from server.tuning.kpi_objective import KpiObjective
from training_core import methods

ENDED_TRIAL_STATES = ("complete", "pruned", "fail")
"""States of a row of a study's trials table once Optuna has been told how the trial ended."""
COST_PARAMETERS = ("max_steps", "epochs", "per_device_batch_size", "gradient_accumulation_steps", "max_seq_length")
"""Hyperparameters a trial's compute grows with: the study is priced at their upper bounds."""
EVALUATIONS_PER_TRIAL = 6
"""With eval_steps auto, a trial reports its held-out loss about this often: enough rungs for
Hyperband to prune at, few enough that evaluating costs little next to training."""


class ParamSpace(RequestModel):
    type: Literal["float", "int", "categorical"] = Field(description="float, int (low, high) or categorical.")
    low: float | None = Field(None, description="Lower bound.")
    high: float | None = Field(None, description="Upper bound.")
    log: bool = Field(False, description="Sample on a log scale (low > 0).")
    choices: list[str | int | float | bool] | None = Field(None, description="For categorical.")


class Strategy(RequestModel):
    sampler: Literal["tpe", "random", "cmaes", "gp"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["hyperband", "median", "successive_halving", "none"] | None = Field(
        None, description="Default: hyperband; none for a KPI objective.")
    objective: str = Field("eval_loss", description="eval_loss (held-out loss), or kpi:SUITE/KPI (an eval suite's "
                           "id or name, a KPI of it or composite).")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="Default: the objective's own.")
    eval_steps: Annotated[StrictInt, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Steps between held-out losses, which pruning reads; auto: about 6 a trial.")
    seed: StrictInt | None = Field(None, ge=0, description="Seeds the sampler: the same study asks the same trials.")


class TuneRequest(RequestModel):
    """A study: the `tune_hyperparameters` fields, without the idempotency key."""

    template: dict[str, Any] = Field(description="A launch_training request (its fields, no dry_run); "
                                     "search_space values replace its own.")
    search_space: dict[str, ParamSpace] = Field(min_length=1, max_length=16, description=(
        "Parameter name -> range. Names: hyperparameters fields (learning_rate, max_steps, warmup_ratio, ...) "
        "or lora.r, lora.alpha, lora.dropout."))
    n_trials: StrictInt = Field(10, ge=1, le=200, description="Trials to run (each a train job).")
    n_parallel: StrictInt = Field(1, ge=1, le=16, description="Trials running at once.")
    budget_flops: float | None = Field(
        None, gt=0, description="Default: n_trials x the costliest trial, and the final retrain (and its eval, "
        "for a KPI objective) if asked for.")
    strategy: Strategy = Field(default_factory=Strategy, description="Sampler, pruner, objective, direction.")
    final_retrain: StrictBool = Field(False, description=(
        "Retrain the best parameters on all the data at the end (with a KPI objective, evaluated on the suite "
        "too); none if the trials held nothing out."))


@dataclass(frozen=True)
class StudyPlan:
    """A study request checked and priced: what admitting it reserves and what its driver runs."""

    template: TrainRequest
    strategy: dict[str, Any]
    kpi: KpiObjective | None
    trial: guardrails.Estimate
    """One trial's training at the search space's upper bounds."""
    eval_flops: float
    budget: float
    eval_steps: int

    @property
    def trial_flops(self) -> float:
        return self.trial.flops + self.eval_flops


def plan_tune(ctx: ServiceContext, agent: Agent, request: TuneRequest) -> StudyPlan:
    """Validate the search space and template and price the study; InvalidRequest names the field."""
    template = _template(request.template)
    with Session(ctx.engine) as session:
        strategy, kpi = resolve_strategy(session, agent, request.strategy, template)
    check_search_space(request.search_space, template)
    upper_bounds = _upper_bounds(request.search_space)
    costliest = trial_request(template, upper_bounds)
    try:
        estimate = build_train_job(ctx, agent, costliest).estimate
    except WeightsmithError as err:
        err.param = f"template.{err.param}" if err.param else "template"
        raise
    guardrails.raise_if_refused(guardrails.check_request(agent, estimate), estimate)
    eval_flops = _eval_flops(ctx, agent, kpi, estimate.parameters) if kpi else 0.0
    trial_flops = estimate.flops + eval_flops
    retrain = request.final_retrain and final_retrain_trains_more(template)
    budget = request.budget_flops or request.n_trials * trial_flops + (
        _final_retrain_flops(ctx, agent, template, upper_bounds) + eval_flops if retrain else 0.0)
    if budget < trial_flops:
        with_eval = f" and {eval_flops:.3g} for its eval" if kpi else ""
        raise InvalidRequest(f"budget_flops {budget:.3g} does not pay for one trial ({estimate.flops:.3g} FLOPs at "
                             f"the search space's upper bounds{with_eval}): raise it, or lower those bounds",
                             param="budget_flops")
    eval_steps = (request.strategy.eval_steps if request.strategy.eval_steps != "auto"
                  else max(1, round(estimate.max_steps / EVALUATIONS_PER_TRIAL)))
    return StudyPlan(template, strategy, kpi, estimate, eval_flops, budget, eval_steps)


def admit_tune(ctx: ServiceContext, agent: Agent, request: TuneRequest, idempotency_key: str | None = None,
               origin: dict[str, Any] | None = None) -> Job:
    """Price the study, reserve its budget and queue it. `origin` links it to what started it (a
    schedule, a pipeline's step)."""
    request_hash = idempotency.request_hash(request)
    if idempotency_key:
        existing = idempotency.existing_job(ctx.engine, agent.id, idempotency_key, request_hash)
        if existing is not None:
            return existing
    plan = plan_tune(ctx, agent, request)
    job = Job(agent_id=agent.id, kind="tune", method=f"{plan.strategy['sampler']}+{plan.strategy['pruner']}",
              state=JobState.queued, request=request.model_dump(mode="json"),
              idempotency_key=idempotency_key, request_hash=request_hash, estimate_flops=plan.budget)
    idempotency.link(job, origin)
    job.resolved = {
        "template": template_json(plan.template),
        "search_space": {name: space.model_dump(mode="json") for name, space in request.search_space.items()},
        "strategy": plan.strategy, "kpi": plan.kpi.as_json() if plan.kpi else None, "n_trials": request.n_trials,
        "n_parallel": request.n_parallel, "budget_flops": plan.budget, "trial_estimate_flops": plan.trial.flops,
        "eval_estimate_flops": plan.eval_flops,
        "max_steps": plan.trial.max_steps, "eval_steps": plan.eval_steps, "final_retrain": request.final_retrain,
        # Where the study is, to check on every start of its driver that it is still there (the
        # driver connects with the service's own URL): not the password, which job rows never hold.
        "studies_url": without_password(ctx.settings.studies_url)}
    with write_transaction(ctx.engine) as session:
        if idempotency_key:  # checked again under the write lock: two retries may race here
            existing = idempotency.existing_in(session, agent.id, idempotency_key, request_hash)
            if existing is not None:
                return existing
        _admit(session, ctx, agent, plan.budget, plan.trial_flops, request.n_parallel)
        session.add(job)
        session.flush()
        session.add(Reservation(agent_id=agent.id, job_id=job.id, flops_reserved=plan.budget))
    ctx.wake_workers()
    return job


def trial_request(template: TrainRequest, params: dict[str, Any]) -> TrainRequest:
    """The template with a trial's parameter values put in, validated as a launch_training request."""
    raw = template_json(template)
    for name, value in params.items():
        section, field = name.split(".", 1) if "." in name else ("hyperparameters", name)
        raw.setdefault(section, {})[field] = value
    return TrainRequest.model_validate(raw)


def final_retrain_trains_more(template: TrainRequest) -> bool:
    """Whether the final retrain would train on more than the trials did. Trials of a template that
    holds nothing out (`eval_fraction` 0, as a KPI objective allows) trained on all the data already:
    a retrain with the best parameters would train the best trial's model again, so there is none,
    and the best trial's model is the study's final model."""
    return template.hyperparameters.eval_fraction > 0


def final_retrain_request(template: TrainRequest, params: dict[str, Any]) -> TrainRequest:
    """The study's last step: `params` trained on all the data, without a held-out part."""
    request = trial_request(template, params)
    hyper = request.hyperparameters.model_copy(update={"eval_fraction": 0.0})
    return request.model_copy(update={"hyperparameters": hyper})


def template_json(template: TrainRequest) -> dict[str, Any]:
    return template.model_dump(mode="json", exclude_defaults=True)


def check_search_space(space: dict[str, ParamSpace], template: TrainRequest) -> None:
    """Every malformed parameter at once, each named, with what to change."""
    problems = []
    for name, param in space.items():
        problem = _param_problem(name, param, template)
        if problem:
            problems.append(f"search_space.{name}: {problem}")
    if problems:
        first = problems[0].split(":", 1)[0]
        raise InvalidRequest("; ".join(problems), param=first)


def _param_problem(name: str, param: ParamSpace, template: TrainRequest) -> str | None:
    section, field = name.split(".", 1) if "." in name else ("hyperparameters", name)
    fields = {"hyperparameters": Hyperparameters.model_fields, "lora": LoraOptions.model_fields}.get(section, {})
    if field not in fields:
        return (f"unknown parameter; use a hyperparameters field ({', '.join(Hyperparameters.model_fields)}) "
                f"or lora.<{'|'.join(LoraOptions.model_fields)}>")
    if field == "eval_fraction":
        return "the objective is the loss on the held-out split, so every trial must hold out the same records"
    if param.type == "categorical":
        if not param.choices or param.low is not None or param.high is not None:
            return "a categorical parameter takes a non-empty `choices` list and no low/high"
        values = list(param.choices)
    else:
        if param.choices is not None or param.low is None or param.high is None:
            return f"a {param.type} parameter takes `low` and `high` (no choices)"
        if param.low >= param.high:
            return f"low ({param.low:g}) must be below high ({param.high:g})"
        if param.log and param.low <= 0:
            return f"log scale needs low > 0 (got {param.low:g})"
        if param.type == "int" and not (param.low.is_integer() and param.high.is_integer()):
            return "an int parameter takes whole-number bounds"
        values = [int(param.low), int(param.high)] if param.type == "int" else [param.low, param.high]
    for value in values:
        try:
            trial_request(template, {name: value})
        except ValidationError as err:
            return f"{value!r} is not a valid {name}: {err.errors()[0]['msg']}"
        except TypeError:  # "auto" where the field takes "auto" only as its default
            return f"{value!r} is not a valid {name}: give numbers"
    return None


def _upper_bounds(space: dict[str, ParamSpace]) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for name, param in space.items():
        if name not in COST_PARAMETERS:
            continue
        if param.type == "categorical":
            numbers = [c for c in param.choices or () if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if numbers:
                bounds[name] = max(numbers)
        else:
            bounds[name] = int(param.high) if param.type == "int" else param.high  # type: ignore[arg-type]
    return bounds


def _template(raw: dict[str, Any]) -> TrainRequest:
    # A launch_training call's own fields mean nothing in a template: each trial is its own launch.
    fields = {key: value for key, value in raw.items() if key not in ("dry_run", "idempotency_key")}
    try:
        template = TrainRequest.model_validate(fields)
    except ValidationError as err:
        raise InvalidRequest.of(problems_of(err, "template.")) from err
    if template.eval_suite:
        # Each trial would queue its own eval against its parent, outside the study's budget and
        # not stopped with it; a KPI objective evaluates every trial within the budget instead.
        raise InvalidRequest(f"a study's template takes no eval_suite: rank the trials by the suite with "
                             f"strategy.objective \"kpi:{template.eval_suite}/<KPI>\", or run_eval the study's "
                             "best_model_id when it ends", param="template.eval_suite")
    return template


def resolve_strategy(session: Session, agent: Agent, strategy: Strategy, template: TrainRequest
                     ) -> tuple[dict[str, Any], KpiObjective | None]:
    """The strategy as the study runs it, every default made explicit (objective, direction,
    pruner), and the KPI objective if it is one."""
    resolved = strategy.model_dump(mode="json")
    if strategy.objective.startswith(kpi_objective.PREFIX):
        kpi = kpi_objective.resolve(session, agent.id, strategy.objective)
        objective, direction = kpi.objective, kpi.direction
        own = (f"the {kpi.kpi} of suite {kpi.suite} is a score, maximized" if kpi.kpi == kpi_objective.COMPOSITE
               else f"KPI {kpi.kpi} of suite {kpi.suite} is {direction}d, as the suite declares")
        if strategy.pruner not in (None, "none"):
            raise InvalidRequest(f"pruner {strategy.pruner} would compare the trials' held-out losses, which are not "
                                 f"the KPI {kpi.kpi} (known only once a trial is evaluated): leave pruner out or "
                                 "give none", param="strategy.pruner")
        pruner = "none"
    elif strategy.objective == "eval_loss":
        kpi, objective, direction, own = None, "eval_loss", "minimize", "eval_loss is a loss: it is minimized"
        if not methods.METHODS[template.method].reports_eval_loss:
            reporting = ", ".join(name for name, m in methods.METHODS.items() if m.reports_eval_loss)
            raise InvalidRequest(f"{template.method} reports no held-out eval_loss to minimize (only {reporting} "
                                 "do): rank its trials by a KPI of an eval suite, strategy.objective "
                                 "\"kpi:SUITE/KPI\"", param="strategy.objective")
        if template.hyperparameters.eval_fraction == 0:
            raise InvalidRequest("the eval_loss objective needs held-out records: set eval_fraction above 0 "
                                 "(final_retrain trains on all the data at the end)",
                                 param="template.hyperparameters.eval_fraction")
        pruner = strategy.pruner or "hyperband"
    else:
        raise InvalidRequest(f"unknown objective {strategy.objective!r}; use eval_loss or kpi:SUITE/KPI",
                             param="strategy.objective")
    if strategy.direction not in (None, direction):
        raise InvalidRequest(f"direction {strategy.direction} contradicts the objective: {own}; leave direction "
                             "out", param="strategy.direction")
    return {**resolved, "objective": objective, "direction": direction, "pruner": pruner}, kpi


def _eval_flops(ctx: ServiceContext, agent: Agent, kpi: KpiObjective, parameters: int) -> float:
    """A trial's eval, priced and checked against the per-request limits it will run under."""
    price = kpi_objective.eval_price(ctx.engine, kpi.suite_id, parameters)
    verdict = guardrails.check_request(agent, price)
    if not verdict.admitted:
        raise LimitExceeded(f"each trial's eval on suite {kpi.suite} would be refused: {verdict.message}",
                            param="strategy.objective", details={"limit": verdict.limit})
    return price.flops


def _final_retrain_flops(ctx: ServiceContext, agent: Agent, template: TrainRequest,
                         upper_bounds: dict[str, Any]) -> float:
    """The final retrain at the search space's upper bounds."""
    return build_train_job(ctx, agent, final_retrain_request(template, upper_bounds)).estimate.flops


def _admit(session: Session, ctx: ServiceContext, caller: Agent, budget: float, trial_flops: float,
           n_parallel: int) -> None:
    """The study and its trials at once must fit the agent's job limit; its budget, what is left."""
    agent = reservations.lock_agent(session, ctx.engine, caller.id)
    active = reservations.active_job_count(session, agent)
    if active + 1 + n_parallel > agent.max_concurrent_jobs:
        fit = agent.max_concurrent_jobs - active - 1
        raise LimitExceeded(
            f"a study with n_parallel={n_parallel} holds {1 + n_parallel} of your {agent.max_concurrent_jobs} jobs at "
            f"once and you have {active} active: " + (f"n_parallel <= {fit} fits" if fit >= 1 else
                                                      "wait for a job to finish (wait_for_job) or cancel one"),
            param="n_parallel")
    left = agent.budget_flops - reservations.budget_spent(session, agent, time.time())
    if budget > left:
        trials = int(max(left, 0) // trial_flops)
        raise LimitExceeded(
            f"the study's budget of {budget:.3g} FLOPs is over what is left of your budget ({max(left, 0):.3g} of "
            f"{agent.budget_flops:.3g}); " + (f"budget_flops <= {left:.3g} (about {trials} trials) fits" if trials
                                              else "not even one trial fits: wait for the window to roll over"),
            param="budget_flops", details={"limit": "budget_flops", "max_trials_that_fit": trials})




def objective_value(metrics: dict[str, Any]) -> float | None:
    """A succeeded trial's objective (the held-out loss after training), or None if it has none."""
    value = metrics.get("eval_loss_after")
    return float(value) if value is not None and math.isfinite(value) else None
