"""Eval suites: what an evaluation measures, declared as YAML or JSON and checked before any job.

    name: support-answers
    dataset: ds_...              # prompt_completion or messages records; metadata kept per item
    cluster_key: source          # optional: items whose metadata.source is equal share a cluster
    decoding: {max_new_tokens: 64, batch_size: 8}
    kpis:
      - {name: exact, grader: {type: exact, ignore_case: true}, threshold: 0.6, allowed_regression: 0.05}
      - {name: ppl, grader: {type: perplexity}, direction: lower, aggregation: median}
    composite: "0.7 * exact + 0.3 * min(1, 10 / ppl)"

A KPI's grader is one of `training_core.graders` (exact, contains, regex, json_schema, length,
similarity) or one that needs the model or agent code, defined here: `perplexity` (of the item's
reference given its prompt), `tool_call` (the output names the reference's tool with the same
arguments) and `python` (agent code run in the sandbox). The composite formula is parsed with
`ast` and only numbers, KPI names, + - * /, parentheses, min and max are accepted: nothing is
ever `eval`ed. Every problem in a suite is reported at once, each with its field.

Only pydantic and the standard library are imported, so the service validates suites without torch.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from training_core import graders

MODEL_GRADERS = ("perplexity", "tool_call", "python")
GRADER_TYPES = (*graders.GRADER_TYPES, *MODEL_GRADERS)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")


class Perplexity(BaseModel):
    """exp(mean negative log-likelihood) of the reference's tokens after the prompt: lower is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["perplexity"]


class ToolCall(BaseModel):
    """The output's tool call (a JSON object {"name", "arguments"}, bare, fenced or in <tool_call>
    tags) names the reference's tool and, unless `match_arguments` is false, its exact arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["tool_call"]
    match_arguments: bool = True

    def score(self, output: str, reference: str | None = None) -> float:
        expected, got = _tool_call(reference or ""), _tool_call(output)
        if expected is None:
            raise ValueError("the item's reference is not a tool call {\"name\", \"arguments\"}")
        if got is None or got[0] != expected[0]:
            return 0.0
        return float(not self.match_arguments or got[1] == expected[1])


class Python(BaseModel):
    """Agent code run in the sandbox: `function(outputs, references, prompts)` returns one score
    (a number, True/False) per item."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["python"]
    code: str = Field(max_length=100_000)
    function: str = "score"
    pass_fail: bool = Field(False, description="Scores are 0/1 (McNemar in the gate), not continuous.")

    @model_validator(mode="after")
    def _defines_function(self) -> Python:
        try:
            tree = ast.parse(self.code)
        except SyntaxError as err:
            raise ValueError(f"code does not compile: line {err.lineno}: {err.msg}") from err
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if self.function not in defined:
            raise ValueError(f"code defines no top-level function {self.function!r} (found: "
                             f"{', '.join(sorted(defined)) or 'none'})")
        return self


class DecodingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(8, ge=1, le=256)
    max_prompt_tokens: int = Field(512, ge=8, le=32768, description="Longer prompts keep their end.")
    # Greedy only: a gate compares two models on the same items, and sampling would add noise to both.
    do_sample: Literal[False] = False


class Kpi(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    grader: dict[str, Any]
    aggregation: Literal["mean", "median", "p10", "p90"] = "mean"
    direction: Literal["higher", "lower"] = "higher"
    threshold: float | None = Field(None, description="The KPI must reach this (>= or <= by direction).")
    allowed_regression: float = Field(0.0, ge=0, description="How much worse than the baseline still passes.")
    weight: float = Field(1.0, ge=0, description="Weight in the default composite (see `composite_value`).")

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("a KPI name is a letter or _ then letters, digits or _ (at most 40), so the "
                             "composite formula can name it")
        return name

    @field_validator("grader")
    @classmethod
    def _known_grader(cls, raw: dict[str, Any]) -> dict[str, Any]:
        parse_grader(raw)
        return raw

    @property
    def pass_fail(self) -> bool:
        grader = parse_grader(self.grader)
        if isinstance(grader, Python):
            return grader.pass_fail
        if isinstance(grader, Perplexity):
            return False
        return isinstance(grader, ToolCall) or graders.is_pass_fail(grader)  # type: ignore[arg-type]


class SuiteDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=120)
    dataset: str = Field(description="Dataset id whose records are the items.")
    cluster_key: str | None = Field(None, description="metadata field shared by items from one source.")
    max_items: int | None = Field(None, ge=1, le=100_000)
    decoding: DecodingSettings = DecodingSettings()
    kpis: list[Kpi] = Field(min_length=1, max_length=32)
    composite: str | None = Field(None, max_length=500)

    @field_validator("kpis")
    @classmethod
    def _distinct_names(cls, kpis: list[Kpi]) -> list[Kpi]:
        names = [kpi.name for kpi in kpis]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"KPI names repeat: {', '.join(repeated)}; give each KPI its own name")
        return kpis

    @field_validator("composite")
    @classmethod
    def _formula_over_kpis(cls, composite: str | None, info: ValidationInfo) -> str | None:
        if composite is not None and "kpis" in info.data:  # invalid KPIs are reported on their own
            parse_formula(composite, {kpi.name for kpi in info.data["kpis"]})
        return composite


def parse_grader(raw: dict[str, Any]) -> Any:
    """A grader object from JSON, declarative or model-side; ValueError names what to fix."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in GRADER_TYPES:
        raise ValueError(f"unknown grader type {kind!r}; use one of {', '.join(GRADER_TYPES)}")
    model = {"perplexity": Perplexity, "tool_call": ToolCall, "python": Python}.get(kind)
    try:
        return model.model_validate(raw) if model else graders.parse(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != kind)
        message = first['msg'].removeprefix('Value error, ')
        raise ValueError(f"{kind} grader: {where + ': ' if where else ''}{message}") from err


def problems(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem of a raw suite as (field, message); empty when it is valid."""
    try:
        SuiteDefinition.model_validate(raw)
    except ValidationError as err:
        return [(".".join(str(p) for p in e["loc"]) or "suite", e["msg"].removeprefix("Value error, "))
                for e in err.errors()]
    return []


# ---- the composite formula -------------------------------------------------------------------------

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_FUNCTIONS = {"min": min, "max": max}


def parse_formula(formula: str, names: set[str]) -> ast.Expression:
    """The formula's syntax tree once every node is one we allow; ValueError says which is not."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"composite is not a formula: {err.msg} at column {err.offset}") from err
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCTIONS:
            raise ValueError(f"composite names {node.id!r}, which is no KPI of this suite "
                             f"(KPIs: {', '.join(sorted(names))})")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                                               and node.args and not node.keywords):
            raise ValueError("composite may call only min(...) and max(...)")
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Name, ast.Load, ast.Call,
                   *_BINARY)
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
            raise ValueError(f"composite may hold numbers only, not {node.value!r}")  # noqa: TRY004 -- pydantic reports ValueError
        if not isinstance(node, (*allowed, ast.Constant)):
            raise ValueError(  # noqa: TRY004 -- pydantic turns a ValueError into a field error
                f"composite may use numbers, KPI names, + - * /, parentheses, min and max; not {type(node).__name__}")
    return tree


def composite_value(definition: SuiteDefinition, values: Mapping[str, float]) -> float | None:
    """The suite's formula, or without one the weighted mean of the KPIs where higher is better
    (a KPI where lower is better has no common scale with them, so it joins only through a formula)."""
    if definition.composite:
        return evaluate_formula(definition.composite, values)
    weighted = [(kpi.weight, values[kpi.name]) for kpi in definition.kpis if kpi.direction == "higher" and kpi.weight]
    total = sum(weight for weight, _ in weighted)
    return sum(weight * value for weight, value in weighted) / total if total else None


def evaluate_formula(formula: str, values: Mapping[str, float]) -> float | None:
    """The composite for these KPI values; None where it is undefined (a KPI missing, division by 0)."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return float(_FUNCTIONS[node.func.id](walk(arg) for arg in node.args))

    try:
        return walk(parse_formula(formula, set(values)))
    except (KeyError, ZeroDivisionError, ValueError, TypeError):
        return None


# ---- items ---------------------------------------------------------------------------------------

def items_from_records(records: list[dict[str, Any]], cluster_key: str | None) -> list[dict[str, Any]]:
    """Eval items from a dataset's records: the prompt (a string, or the conversation up to its last
    assistant turn), the reference (the completion or that turn), metadata and a cluster key."""
    items = []
    for index, record in enumerate(records):
        metadata = record.get("metadata") or {}
        if "messages" in record:
            turns = record["messages"]
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompt: str | list[dict[str, str]] = [{"role": t["role"], "content": t["content"]} for t in turns[:last]]
            reference = turns[last]["content"]
        elif "prompt" in record:
            prompt, reference = record["prompt"], record["completion"]
        else:
            raise ValueError("eval items need prompt_completion or messages records, not text")
        cluster = metadata.get(cluster_key) if cluster_key else None
        items.append({"index": index, "prompt": prompt, "reference": reference, "metadata": metadata,
                      "cluster": None if cluster is None else str(cluster)})
    return items


def _tool_call(text: str) -> tuple[str, Any] | None:
    """(name, arguments) of the first JSON object in `text` that has a "name", else None."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            return value["name"], arguments
    return None
