"""What a firing or a pipeline step starts: work of one kind, admitted exactly as the agent's own call
of that kind's tool would be (the same validation, price and limits), and linked to what started it.

    train  the launch_training fields          tune   the tune_hyperparameters fields
    synth  the generate_synthetic_data fields  eval   {model, suite_id, baseline?, max_seconds?}

`key` makes starting idempotent: a firing (`schedule:ID:TIME`) or a step (`pipeline:JOB:STEP`) that
is started again after a crash finds the job it started the first time instead of starting another.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from server.admission.requests import RequestModel
from server.admission.synth import SynthRequest, admit_synth, build_synth_job
from server.admission.train import TrainRequest, admit_train, build_train_job, check_train_request
from server.context import ServiceContext
from server.errors import InvalidRequest, problems_from
from server.evaluation import jobs as eval_jobs
from server.store.tables import Agent, Job
from server.tuning.admission import TuneRequest, admit_tune, plan_tune

Kind = Literal["train", "tune", "synth", "eval"]


class EvalRequest(RequestModel):
    model: str = Field(description="A model id (mdl_...), alias:NAME, or a model directory in a data root.")
    suite_id: str = Field(description="The eval suite (suite_...).")
    baseline: str | None = Field(None, description="Model to gate against; default the model's parent; none: no "
                                 "gate.")
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap.")


MODELS: dict[str, type[RequestModel]] = {"train": TrainRequest, "tune": TuneRequest, "synth": SynthRequest,
                                         "eval": EvalRequest}


def parsed(kind: str, request: dict[str, Any], param: str, skip: set[tuple[str | int, ...]] | None = None
           ) -> RequestModel | None:
    """The request as its kind's model, or InvalidRequest naming every field; problems at `skip`
    (values a pipeline fills in later from earlier steps) are left for when they are filled in, and
    then None is returned."""
    found = parse_model(MODELS[kind], request, param, skip)
    if isinstance(found, TrainRequest):
        try:
            check_train_request(found)
        except InvalidRequest as err:
            raise InvalidRequest.of([(f"{param}.{where}", message) for where, message in err.problems()]) from err
    return found


def parse_model(model: type[RequestModel], request: dict[str, Any], param: str,
                skip: set[tuple[str | int, ...]] | None = None) -> RequestModel | None:
    try:
        return model.model_validate(request)
    except ValidationError as err:
        errors = [e for e in err.errors(include_url=False)
                  if not any(tuple(e["loc"][: len(s)]) == s for s in skip or ())]
        if errors:
            raise InvalidRequest.of(problems_from(errors, f"{param}.", model)) from err
        return None


def price_flops(ctx: ServiceContext, agent: Agent, kind: str, request: dict[str, Any]) -> float:
    """What one start of this work reserves, as its dry run would say (a study: its whole budget)."""
    parsed_request = parsed(kind, request, "request")
    if isinstance(parsed_request, TrainRequest):
        return build_train_job(ctx, agent, parsed_request).estimate.flops
    if isinstance(parsed_request, SynthRequest):
        return build_synth_job(ctx, agent, parsed_request)[1].estimate.flops
    if isinstance(parsed_request, EvalRequest):
        return eval_jobs.plan_eval(ctx, agent.id, parsed_request.model, parsed_request.suite_id,
                                   parsed_request.baseline, parsed_request.max_seconds).price.flops
    assert isinstance(parsed_request, TuneRequest)
    return plan_tune(ctx, agent, parsed_request).budget


def start(ctx: ServiceContext, agent: Agent, kind: str, request: dict[str, Any], *, key: str,
          origin: dict[str, Any]) -> Job:
    """Admit and queue the work as the agent, or raise what its tool would (LimitExceeded, ...)."""
    parsed_request = parsed(kind, request, "request")
    if isinstance(parsed_request, TrainRequest):
        return admit_train(ctx, agent, parsed_request, key, origin)
    if isinstance(parsed_request, TuneRequest):
        return admit_tune(ctx, agent, parsed_request, key, origin)
    linked = {**origin, "idempotency_key": key}
    if isinstance(parsed_request, SynthRequest):
        return admit_synth(ctx, agent, parsed_request, linked)[0]
    assert isinstance(parsed_request, EvalRequest)
    plan = eval_jobs.plan_eval(ctx, agent.id, parsed_request.model, parsed_request.suite_id, parsed_request.baseline,
                               parsed_request.max_seconds)
    job = eval_jobs.queue_eval(ctx.engine, ctx.settings.runs_dir, agent, plan.suite_row, plan.candidate,
                               plan.baseline, max_seconds=parsed_request.max_seconds, request=request, origin=linked)
    ctx.wake_workers()
    return job
