"""Declarative graders: score one model output against a rule or a reference, from 0 to 1.

Used by GRPO as rewards and by evaluation suites as KPI graders. A grader is plain JSON
(`{"type": "regex", "pattern": "^yes"}`), validated here so a bad one is refused with the field
to fix before any job starts. Pass/fail graders score 0 or 1; `similarity` without a threshold
scores continuously.

    exact       the output equals `value` (or the item's reference)
    contains    the output contains `value` (or the reference)
    regex       `pattern` is found in the output (or matches it whole with `fullmatch`)
    json_schema the output parses as JSON and is valid against `schema`
    length      the output's length (chars or words) is within [min, max]
    similarity  ROUGE-L F1 or fuzzy ratio to `value` (or the reference); pass/fail above `threshold`

Graders that need a model (perplexity, a judge) or agent code (Python in the sandbox) live with
their callers; this module needs neither torch nor a subprocess.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from rapidfuzz import fuzz
from rapidfuzz.distance import LCSseq

_WORD = re.compile(r"\w+", re.UNICODE)


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = Field(None, max_length=80, description="Label in reports; defaults to the type.")
    weight: float = Field(1.0, description="Weight when several graders are summed into one reward.")

    @property
    def label(self) -> str:
        return self.name or str(self.type)

    def score(self, output: str, reference: str | None = None) -> float:
        raise NotImplementedError

    def _target(self, value: str | None, reference: str | None) -> str:
        target = value if value is not None else reference
        if target is None:
            raise ValueError(f"grader {self.label!r} has no value and the item has no reference")
        return target


class Exact(_Grader):
    type: Literal["exact"]
    value: str | None = Field(None, description="Expected output; default: the item's reference.")
    ignore_case: bool = False
    strip: bool = True

    def score(self, output: str, reference: str | None = None) -> float:
        expected = self._target(self.value, reference)
        return float(_normal(output, self.ignore_case, self.strip) == _normal(expected, self.ignore_case, self.strip))


class Contains(_Grader):
    type: Literal["contains"]
    value: str | None = Field(None, description="Text that must appear; default: the item's reference.")
    ignore_case: bool = False

    def score(self, output: str, reference: str | None = None) -> float:
        needle = self._target(self.value, reference)
        return float(_normal(needle, self.ignore_case, True) in _normal(output, self.ignore_case, False))


class Regex(_Grader):
    type: Literal["regex"]
    pattern: str = Field(max_length=2000)
    fullmatch: bool = False
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid regular expression: {err}") from err
        return pattern

    def score(self, output: str, reference: str | None = None) -> float:
        compiled = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        found = compiled.fullmatch(output.strip()) if self.fullmatch else compiled.search(output)
        return float(found is not None)


class JsonSchema(_Grader):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="A JSON Schema the output must satisfy.")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"invalid JSON schema: {err.message}") from err
        return schema

    def score(self, output: str, reference: str | None = None) -> float:
        try:
            document = json.loads(_strip_code_fence(output))
        except (json.JSONDecodeError, ValueError):
            return 0.0
        validator = jsonschema.validators.validator_for(self.json_schema)(self.json_schema)
        return float(validator.is_valid(document))


class Length(_Grader):
    type: Literal["length"]
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=0)
    unit: Literal["chars", "words"] = "chars"

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value < info.data.get("min", 0):
            raise ValueError("max must be at least min")
        return value

    def score(self, output: str, reference: str | None = None) -> float:
        size = len(output) if self.unit == "chars" else len(_WORD.findall(output))
        return float(size >= self.min and (self.max is None or size <= self.max))


class Similarity(_Grader):
    type: Literal["similarity"]
    metric: Literal["rouge_l", "fuzzy"] = "rouge_l"
    value: str | None = Field(None, description="Text to compare with; default: the item's reference.")
    threshold: float | None = Field(None, ge=0, le=1, description="Pass/fail at this score; none: the score itself.")

    def score(self, output: str, reference: str | None = None) -> float:
        target = self._target(self.value, reference)
        value = rouge_l(output, target) if self.metric == "rouge_l" else fuzz.ratio(output, target) / 100.0
        return value if self.threshold is None else float(value >= self.threshold)


Grader = Annotated[Exact | Contains | Regex | JsonSchema | Length | Similarity, Field(discriminator="type")]
GRADER_TYPES = ("exact", "contains", "regex", "json_schema", "length", "similarity")
_ADAPTER: TypeAdapter[Grader] = TypeAdapter(Grader)


def parse(raw: dict[str, Any]) -> _Grader:
    """A grader from JSON; raises pydantic's ValidationError naming the field to fix."""
    return _ADAPTER.validate_python(raw)


def is_pass_fail(grader: _Grader) -> bool:
    return not (isinstance(grader, Similarity) and grader.threshold is None)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (the longest common subsequence)."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return float(a == b)
    common = LCSseq.similarity(a, b)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def _normal(text: str, ignore_case: bool, strip: bool) -> str:
    text = text.strip() if strip else text
    return text.casefold() if ignore_case else text


def _strip_code_fence(text: str) -> str:
    """Models often wrap JSON in a ``` fence; the content is what is graded."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return stripped
