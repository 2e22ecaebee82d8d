"""Declarative graders score known answers exactly and refuse malformed declarations by field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training_core import graders


@pytest.mark.parametrize(("raw", "output", "reference", "expected"), [
    ({"type": "exact"}, " Paris ", "Paris", 1.0),
    ({"type": "exact", "ignore_case": True}, "paris", "Paris", 1.0),
    ({"type": "exact"}, "paris", "Paris", 0.0),
    ({"type": "contains", "value": "dBm"}, "under -27 dBm", None, 1.0),
    ({"type": "contains"}, "no", "dBm", 0.0),
    ({"type": "regex", "pattern": r"^T\d$", "fullmatch": True}, "T2", None, 1.0),
    ({"type": "regex", "pattern": r"T\d"}, "ticket T", None, 0.0),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '```json\n{"a": 1}\n```', None, 1.0),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', None, 0.0),
    ({"type": "json_schema", "schema": {"type": "object"}}, "not json", None, 0.0),
    ({"type": "length", "min": 2, "max": 3, "unit": "words"}, "two words", None, 1.0),
    ({"type": "length", "max": 3}, "four", None, 0.0),
    ({"type": "similarity"}, "the cat sat", "the cat sat", 1.0),
    ({"type": "similarity", "threshold": 0.9}, "the cat", "the cat sat on the mat", 0.0),
])
def test_known_answers_score_exactly(raw, output, reference, expected):
    assert graders.parse(raw).score(output, reference) == expected


def test_rouge_l_is_the_lcs_f1():
    # LCS of "a b c d" and "a c e" is "a c": precision 2/4, recall 2/3, F1 = 4/7.
    assert graders.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)


def test_similarity_without_threshold_is_continuous():
    grader = graders.parse({"type": "similarity", "metric": "fuzzy"})
    assert 0.0 < grader.score("kitten", "sitting") < 1.0
    assert not graders.is_pass_fail(grader)


@pytest.mark.parametrize(("raw", "field", "says"), [
    ({"type": "regex", "pattern": "(unclosed"}, "pattern", "invalid regular expression"),
    ({"type": "json_schema", "schema": {"type": "nonsense"}}, "schema", "invalid JSON schema"),
    ({"type": "length", "min": 5, "max": 2}, "max", "at least min"),
    ({"type": "telepathy"}, "type", "exact"),
    ({"type": "exact", "valu": "x"}, "valu", "Extra inputs"),
])
def test_malformed_graders_are_refused_naming_the_field(raw, field, says):
    with pytest.raises(ValidationError) as caught:
        graders.parse(raw)
    assert field in str(caught.value) and says in str(caught.value)


def test_a_grader_without_value_needs_a_reference():
    with pytest.raises(ValueError, match="no reference"):
        graders.parse({"type": "exact"}).score("x", None)
