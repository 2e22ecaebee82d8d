"""Conditions: the safe `when` language, checked against a schema at parse time, explained at run time."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import InvalidRequest
from server.schedules.conditions import parse

KPI = {"value": None, "delta": None, "verdict": None}
SCHEMA = {"state": None, "report": {"verdict": None, "kpis": {"*": KPI}, "items": None},
          "train": {"metrics": {"*": None}, "model_id": None}}
PASSING: dict[str, Any] = {"state": "succeeded",
           "report": {"verdict": "pass", "items": [1, 2, 3],
                      "kpis": {"tool_call": {"value": 0.84, "delta": 0.03, "verdict": "pass"},
                               "exact": {"value": 0.5, "delta": -0.1, "verdict": "fail"}}},
           "train": {"metrics": {"eval_loss": 1.25}, "model_id": "mdl_1"}}


def _holds(text: str, context: dict = PASSING) -> bool:
    return parse(text, "when", SCHEMA).evaluate(context)


@pytest.mark.parametrize(("text", "held"), [
    ('report.verdict == "pass"', True),
    ('report.verdict != "pass"', False),
    ("report.kpis.tool_call.value >= 0.8 and report.kpis.tool_call.delta > 0", True),
    ('report.kpis["tool_call"].delta > -0.02', True),
    ("0.8 < report.kpis.tool_call.value < 0.9 <= 1", True),
    ("0.8 < report.kpis.exact.value < 0.9", False),
    ('report.kpis.exact.verdict in ["pass", "warn"] or state == "succeeded"', True),
    ('"tool_call" in report.kpis and "bleu" not in report.kpis', True),
    ("not report.kpis.exact.value > 0.6", True),
    ("report.kpis.tool_call.value - report.kpis.exact.value * 2 / 4 > 0.5", True),
    ("-report.kpis.exact.delta == 0.1", True),
    ("min(train.metrics.eval_loss, 9) < 1.5 and max(1, 2, 3) == 3", True),
    ("abs(report.kpis.exact.delta) >= 0.1 and len(report.items) == 3", True),
    ("report.verdict != null and true and not false", True),
    ("report.verdict != None and True", True),
    ("report.items[0] == 1 and report.items[-1] == 3", True),
])
def test_conditions_evaluate_like_their_text_reads(text: str, held: bool) -> None:
    assert _holds(text) is held


def test_a_missing_value_makes_only_its_comparison_false_and_explain_says_which() -> None:
    condition = parse('report.kpis.bleu.value > 0.3 or report.verdict == "pass"', "when", SCHEMA)
    assert condition.evaluate(PASSING)
    assert not parse("report.kpis.bleu.value > 0.3", "when", SCHEMA).evaluate(PASSING)
    assert parse("report.kpis.bleu.value > 0.3", "when", SCHEMA).explain(PASSING) == (
        "report.kpis.bleu.value > 0.3 is false (report.kpis.bleu is missing)")
    assert not _holds('state == "succeeded"', {})


def test_values_of_the_wrong_type_make_the_comparison_false_instead_of_raising() -> None:
    context = {"report": {"verdict": "pass", "kpis": {"x": {"value": "high", "delta": None}}}}
    assert not _holds("report.kpis.x.value > 0.5", context)
    assert not _holds("report.kpis.x.delta + 1 > 0", context)
    explained = parse("report.kpis.x.value / 0 > 1", "when", SCHEMA).explain(
        {"report": {"kpis": {"x": {"value": 2}}}})
    assert explained == "report.kpis.x.value / 0 > 1 is false (report.kpis.x.value / 0 divides by zero)"


def test_explain_shows_the_values_behind_the_verdict() -> None:
    failing = {**PASSING, "report": {**PASSING["report"], "verdict": "fail"}}
    condition = parse('report.verdict == "pass" and report.kpis.tool_call.value >= 0.8', "when", SCHEMA)
    assert condition.explain(failing) == 'report.verdict == "pass" is false (report.verdict is "fail")'
    assert condition.explain(PASSING) == ('report.verdict == "pass" is true (report.verdict is "pass") and '
                                          "report.kpis.tool_call.value >= 0.8 is true "
                                          "(report.kpis.tool_call.value is 0.84)")
    assert parse('not state == "succeeded"', "when", SCHEMA).explain(PASSING) == (
        'state == "succeeded" is true (state is "succeeded"), so not state == "succeeded" is false')


@pytest.mark.parametrize(("text", "words"), [
    ("lambda: 1", "a lambda at column 1"),
    ("[k for k in report.kpis]", "a comprehension"),
    ('__import__("os").system("true")', "uses a call to"),
    ('__import__("os")', "a call to __import__(...)"),
    ("eval('1')", "a call to eval(...)"),
    ("report.__class__", "a name starting with _"),
    ('report["__class__"]', "a name starting with _"),
    ('"abc".upper() == "ABC"', "a call to 'abc'.upper(...)"),
    ("report.kpis[state]", "a subscript that is not a constant"),
    ("report.items[0:2]", "a subscript that is not a constant"),
    ("state if report else 1", "an if-expression"),
    ("state is None", "`is`"),
    ("report.items % 2", "%"),
    ("2 ** 64 > 1", "**"),
    ('f"{state}" == "x"', "an f-string"),
    ("(x := 1)", "an assignment"),
    ("{1: 2}", "a dict"),
    ("max(*report.items) > 1", "a starred argument"),
    ("len(obj=report.items) > 1", "without positional arguments"),
    ("state == b'x'", "the constant b'x'"),
    ("state ==", "is not a condition"),
    ("import os", "is not a condition"),
])
def test_constructs_outside_the_language_are_refused_with_position_and_what_is_allowed(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(text, "pipeline.steps[3].when", SCHEMA)
    assert refused.value.param == "pipeline.steps[3].when"
    assert words in refused.value.message
    assert "min, max, abs, len" in refused.value.message


def test_a_refusal_names_the_line_and_column_of_a_construct_after_the_first_line() -> None:
    with pytest.raises(InvalidRequest, match="a comprehension at line 2, column 5"):
        parse('(state == "x" or\n    [k for k in state])', "when", SCHEMA)


@pytest.mark.parametrize("text", ["", "   ", "x" * 1001])
def test_an_empty_or_overlong_condition_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match="a condition is 1 to 1000 characters"):
        parse(text, "when", SCHEMA)


@pytest.mark.parametrize("text", ["-" * 900 + "1 > 0", "1" + " + 1" * 240 + " > 0", "not " * 240 + "true"])
def test_a_deeply_nested_condition_is_refused_rather_than_overflowing_the_stack(text: str) -> None:
    with pytest.raises(InvalidRequest, match="nests deeper than 40 levels"):
        parse(text, "when", SCHEMA)


@pytest.mark.parametrize(("text", "words"), [
    ('report.verdic == "pass"', "report.verdic is not a field; report has: items, kpis, verdict"),
    ('reprt.verdict == "pass"', "reprt is not a field; the names available are: report, state, train"),
    ("report.kpis.tool_call.mean > 1",
     "report.kpis.tool_call.mean is not a field; report.kpis.tool_call has: delta, value, verdict"),
    ('state.code == "x"', "state is a value, not an object, so it has no field 'code'"),
    ("len > 1", "len is not a field"),
])
def test_unknown_fields_are_refused_when_parsed_naming_what_is_there(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(text, "when", SCHEMA)
    assert words in refused.value.message


def test_a_wildcard_level_accepts_any_name_such_as_a_kpi() -> None:
    assert parse("report.kpis.anything_at_all.value > 0", "when", SCHEMA)
    assert parse('train.metrics["eval/loss"] < 2', "when", SCHEMA).evaluate(
        {"train": {"metrics": {"eval/loss": 1.0}}})
