"""Pipelines: steps, `${step.output}` references and conditions, checked before anything is created."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from server.errors import InvalidRequest
from server.schedules.pipelines import condition_schema, parse_pipeline, resolve_request, step_condition

GATED: dict[str, Any] = {"steps": [
    {"name": "data", "kind": "synth", "request": {"seed_dataset": "tickets", "records": 200}},
    {"name": "train", "kind": "train",
     "request": {"base_model": "alias:production", "datasets": ["${data.dataset_id}"], "method": "sft",
                 "hyperparameters": {"learning_rate": "auto"}}},
    {"name": "gate", "kind": "eval",
     "request": {"model": "${train.model_id}", "baseline": "alias:production", "suite": "support"}},
    {"name": "ship", "kind": "promote",
     "request": {"alias": "production", "model": "${train.model_id}", "report": "${gate.report_id}",
                 "note": {"kpi": "${gate.kpis.tool_call.value}"}},
     "when": 'gate.verdict == "pass" and gate.kpis.tool_call.value >= 0.8'}]}
OUTPUTS: dict[str, Any] = {"data": {"dataset_id": "ds_1"},
           "train": {"job_id": "job_1", "model_id": "mdl_1", "metrics": {"eval_loss": 1.2}},
           "gate": {"job_id": "job_2", "report_id": "rep_1", "verdict": "pass",
                    "kpis": {"tool_call": {"value": 0.84, "delta": 0.02}}}}


def _with(index: int, **changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GATED)
    raw["steps"][index].update(changes)
    return raw


def test_a_gated_synth_train_eval_promote_pipeline_is_accepted() -> None:
    pipeline = parse_pipeline(GATED)
    assert [(step.name, step.kind) for step in pipeline.steps] == [
        ("data", "synth"), ("train", "train"), ("gate", "eval"), ("ship", "promote")]
    assert set(condition_schema(pipeline, 3)) == {"data", "train", "gate"}
    assert condition_schema(pipeline, 0) == {}


def test_references_are_replaced_by_earlier_outputs_keeping_their_type() -> None:
    pipeline = parse_pipeline(GATED)
    assert resolve_request(pipeline.steps[1], OUTPUTS)["datasets"] == ["ds_1"]
    assert resolve_request(pipeline.steps[3], OUTPUTS) == {
        "alias": "production", "model": "mdl_1", "report": "rep_1", "note": {"kpi": 0.84}}
    assert pipeline.steps[3].request["model"] == "${train.model_id}"  # the spec itself is left as written


def test_an_output_the_earlier_step_did_not_make_is_refused_at_run_time_naming_the_field() -> None:
    raw = _with(2, request={"model": "${train.model_id}", "threshold": "${train.metrics.eval_accuracy}"})
    with pytest.raises(InvalidRequest) as refused:
        resolve_request(parse_pipeline(raw).steps[2], OUTPUTS, param="pipeline.steps[2].request")
    assert refused.value.param == "pipeline.steps[2].request.threshold"
    assert "step 'train' made no metrics.eval_accuracy" in refused.value.message


def test_a_step_condition_holds_or_not_on_earlier_outputs_and_says_why() -> None:
    condition = step_condition(parse_pipeline(GATED), 3)
    assert condition is not None and condition.evaluate(OUTPUTS)
    failing = {**OUTPUTS, "gate": {**OUTPUTS["gate"], "verdict": "fail"}}
    assert not condition.evaluate(failing)
    assert condition.explain(failing) == 'gate.verdict == "pass" is false (gate.verdict is "fail")'
    assert step_condition(parse_pipeline(GATED), 1) is None


@pytest.mark.parametrize(("raw", "param", "words"), [
    (_with(2, request={"model": "${train.dataset_id}"}), "pipeline.steps[2].request.model",
     "train.dataset_id is not a field; train has: job_id, metrics, model_id (the outputs of a train step)"),
    (_with(1, request={"base_model": "${gate.model_id}"}), "pipeline.steps[1].request.base_model",
     "uses step 'gate', which does not come before this one"),
    (_with(1, request={"base_model": "${train.model_id}"}), "pipeline.steps[1].request.base_model",
     "uses step 'train', which does not come before this one"),
    (_with(1, request={"datasets": ["${dta.dataset_id}"]}), "pipeline.steps[1].request.datasets[0]",
     "names no earlier step 'dta'; earlier steps: data"),
    (_with(3, request={"model": "${gate.kpis.tool_call.mean}"}), "pipeline.steps[3].request.model",
     "gate.kpis.tool_call has: ci95_high, ci95_low, delta, p_value, value, verdict"),
    (_with(3, request={"model": "mdl_${train.model_id}"}), "pipeline.steps[3].request.model",
     "a reference is a whole string value"),
    (_with(3, request={"model": "${train}"}), "pipeline.steps[3].request.model", "names no output"),
    (_with(3, when="gate.verdict = 'pass'"), "pipeline.steps[3].when", "is not a condition"),
    (_with(3, when="gate.report.verdict == 'pass'"), "pipeline.steps[3].when",
     "gate.report is not a field; gate has: job_id, kpis, report_id, verdict"),
    (_with(1, when="gate.verdict == 'pass'"), "pipeline.steps[1].when",
     "gate is not a field; the names available are: data"),
    (_with(2, name="data"), "pipeline.steps[2].name", "'data' already names steps[0]"),
    (_with(2, name="Gate-1"), "pipeline.steps[2].name", "is not a step name"),
    (_with(2, kind="deploy"), "pipeline.steps[2].kind",
     "must be one of synth, train, tune, eval or promote"),
    (_with(2, after="train"), "pipeline.steps[2].after",
     "is not a field here; the fields are name, kind, request, when"),
    ({"steps": []}, "pipeline.steps", "needs at least 1 item"),
    ({"stages": []}, "pipeline.steps", "is required"),
])
def test_malformed_pipelines_are_refused_naming_the_field(raw: dict, param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_pipeline(raw)
    assert refused.value.param == param
    assert words in refused.value.message


def test_every_problem_in_a_pipeline_is_reported_at_once() -> None:
    raw = _with(3, request={"model": "${eval.model_id}"}, when="ship.alias == 'x'")
    raw["steps"][2]["name"] = "train"
    with pytest.raises(InvalidRequest) as refused:
        parse_pipeline(raw)
    message = refused.value.message
    assert refused.value.param == "pipeline.steps[2].name"
    assert message.count("pipeline.steps[") == 3
    assert "pipeline.steps[3].request.model: '${eval.model_id}' names no earlier step 'eval'" in message
    assert "pipeline.steps[3].when: `ship.alias == 'x'`: ship is not a field" in message


def test_a_tune_steps_best_params_and_an_eval_kpi_can_be_referenced() -> None:
    raw = {"steps": [
        {"name": "search", "kind": "tune", "request": {"trials": 8}},
        {"name": "final", "kind": "train", "request": {"hyperparameters": "${search.best_params}",
                                                      "base_model": "${search.model_id}"},
         "when": "search.best_value < 1.5 and search.best_params.learning_rate > 0"}]}
    pipeline = parse_pipeline(raw)
    outputs = {"search": {"model_id": "mdl_9", "best_value": 1.1, "best_params": {"learning_rate": 3e-4}}}
    assert resolve_request(pipeline.steps[1], outputs) == {"hyperparameters": {"learning_rate": 3e-4},
                                                           "base_model": "mdl_9"}
    assert step_condition(pipeline, 1).evaluate(outputs)  # type: ignore[union-attr]
