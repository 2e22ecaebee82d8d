"""Eval suites: parsing, the safe composite formula, and scoring items with known answers."""

from __future__ import annotations

import pytest

from training_core import suite
from training_core.evaluate import _aggregates, _score
from training_core.sandboxed import available_isolation

ITEMS = [
    {"index": 0, "prompt": "Capital of France?", "reference": "Paris", "metadata": {}, "cluster": None},
    {"index": 1, "prompt": "2+2?", "reference": "4", "metadata": {}, "cluster": None},
    {"index": 2, "prompt": "Call the weather tool for Oslo", "metadata": {}, "cluster": None,
     "reference": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
    {"index": 3, "prompt": "Give JSON", "reference": '{"ok": true}', "metadata": {}, "cluster": None},
]
OUTPUTS = ["paris", "The answer is 4.", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
           '```json\n{"ok": true}\n```']


def _suite(kpis: list[dict], composite: str | None = None) -> suite.SuiteDefinition:
    return suite.SuiteDefinition.model_validate({"name": "known", "dataset": "ds_x", "kpis": kpis,
                                                 "composite": composite})


def test_a_suite_with_known_answers_scores_exactly() -> None:
    definition = _suite([
        {"name": "exact", "grader": {"type": "exact", "ignore_case": True}},
        {"name": "contains", "grader": {"type": "contains"}},
        {"name": "digits", "grader": {"type": "regex", "pattern": r"\d"}},
        {"name": "json_ok", "grader": {"type": "json_schema", "schema": {"type": "object", "required": ["ok"]}}},
        {"name": "rouge", "grader": {"type": "similarity", "metric": "rouge_l"}},
        {"name": "short", "grader": {"type": "length", "max": 20}},
    ], composite="0.5 * exact + 0.5 * max(digits, short) - 1 / 4")
    scores = _score(definition, ITEMS, OUTPUTS, None)
    assert scores["exact"] == [1.0, 0.0, 0.0, 0.0]
    assert scores["contains"] == [0.0, 1.0, 1.0, 1.0]
    assert scores["digits"] == [0.0, 1.0, 0.0, 0.0]
    assert scores["json_ok"] == [0.0, 0.0, 0.0, 1.0]
    assert scores["rouge"][0] == 1.0 and scores["rouge"][1] == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert scores["short"] == [1.0, 1.0, 0.0, 0.0]  # the fenced JSON is 22 characters
    values = _aggregates(definition, scores)
    assert values["exact"] == 0.25 and values["contains"] == 0.75
    assert suite.evaluate_formula(definition.composite or "", values) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5 - 0.25)


def test_tool_call_grader_matches_name_and_arguments() -> None:
    grader = suite.parse_grader({"type": "tool_call"})
    reference = ITEMS[2]["reference"]
    assert grader.score(OUTPUTS[2], reference) == 1.0
    assert grader.score('{"name": "get_weather", "arguments": {"city": "Bergen"}}', reference) == 0.0
    assert grader.score('{"name": "get_time", "arguments": {"city": "Oslo"}}', reference) == 0.0
    assert grader.score('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', reference) == 1.0
    loose = suite.parse_grader({"type": "tool_call", "match_arguments": False})
    assert loose.score('{"name": "get_weather", "arguments": {}}', reference) == 1.0


@pytest.mark.skipif(not available_isolation(), reason="no sandbox isolation on this machine")
def test_python_grader_runs_agent_code_in_the_sandbox() -> None:
    code = ("def score(outputs, references, prompts):\n"
            "    return [len(o) > len(r) for o, r in zip(outputs, references)]\n")
    definition = _suite([{"name": "longer", "grader": {"type": "python", "code": code, "pass_fail": True}}])
    assert _score(definition, ITEMS, OUTPUTS, None)["longer"] == [0.0, 1.0, 1.0, 1.0]
    assert definition.kpis[0].pass_fail


def test_malformed_suites_are_refused_field_by_field() -> None:
    found = dict(suite.problems({
        "name": "bad", "dataset": "ds_x", "colour": "blue",
        "kpis": [{"name": "a", "grader": {"type": "bleu"}},
                 {"name": "b", "grader": {"type": "regex", "pattern": "(["}},
                 {"name": "c", "grader": {"type": "exact"}, "direction": "up"},
                 {"name": "2d", "grader": {"type": "exact"}, "allowed_regression": -1}]}))
    assert "unknown grader type 'bleu'" in found["kpis.0.grader"]
    assert "invalid regular expression" in found["kpis.1.grader"]
    assert "'higher' or 'lower'" in found["kpis.2.direction"]
    assert "letter or _" in found["kpis.3.name"]
    assert "kpis.3.allowed_regression" in found and "colour" in found
    missing = dict(suite.problems({"name": "f", "dataset": "ds_x", "kpis": [{"name": "a", "grader": {"type": "exact"}}],
                                   "composite": "a + accuracy"}))
    assert "'accuracy', which is no KPI" in missing["composite"]


@pytest.mark.parametrize("formula", ["__import__('os').system('true')", "a.real", "a ** 2", "[a]", "'a'",
                                     "a if a else 1", "lambda: 1", "min(a, key=abs)"])
def test_composite_formulas_beyond_arithmetic_are_refused_and_never_evaluated(formula: str) -> None:
    with pytest.raises(ValueError, match="composite"):
        suite.parse_formula(formula, {"a"})


def test_without_a_formula_the_composite_is_the_weighted_mean_of_higher_is_better_kpis() -> None:
    definition = _suite([{"name": "a", "grader": {"type": "exact"}, "weight": 3},
                         {"name": "b", "grader": {"type": "contains"}},
                         {"name": "ppl", "grader": {"type": "perplexity"}, "direction": "lower"}])
    assert suite.composite_value(definition, {"a": 1.0, "b": 0.0, "ppl": 12.0}) == 0.75


def test_composite_formula_arithmetic_and_undefined_values() -> None:
    value = suite.evaluate_formula("-(a - 2 * b) / 4 + min(a, b, 0.5)", {"a": 1.0, "b": 0.25})
    assert value == pytest.approx(-0.125 + 0.25)
    assert suite.evaluate_formula("a / b", {"a": 1.0, "b": 0.0}) is None


def test_items_come_from_prompt_completion_and_chat_records_with_cluster_keys() -> None:
    items = suite.items_from_records([
        {"prompt": "p", "completion": "c", "metadata": {"source": "doc1"}},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "u2"}]},
    ], "source")
    assert items[0] == {"index": 0, "prompt": "p", "reference": "c", "metadata": {"source": "doc1"}, "cluster": "doc1"}
    assert items[1]["prompt"] == [{"role": "user", "content": "u"}] and items[1]["reference"] == "a"
    assert items[1]["cluster"] is None
