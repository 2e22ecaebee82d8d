"""The `when` language of schedules and pipeline steps: a small expression over a run's results.

    eval.verdict == "pass" and eval.kpis.tool_call.value >= 0.8
    state == "succeeded" and min(train.metrics.eval_loss, 9) < 1.5
    report.kpis["tool_call"].delta > -0.02 or report.verdict in ["pass", "warn"]

Like the eval suites' composite formulas (`training_core/suite.py`), a condition is parsed with
`ast` and only the nodes below are accepted; nothing is ever `eval`ed. Allowed: `and`, `or`,
`not`; comparisons `== != < <= > >= in` and `not in`, chained too; `+ - * /` and unary minus;
numbers, strings, `true`/`false`/`null` (or Python's spelling); lists of values for `in`; field
names with dots or constant subscripts; and `min`, `max`, `abs`, `len`. Field names are checked
against a schema when the condition is parsed, so a typo is refused before anything is created.

Fields are looked up in plain dicts, never with `getattr`, so no Python attribute (dunder or
other) is ever reached. At run time a value that is missing, or an operation on the wrong types,
makes the comparison it is part of false (not the whole condition), and `explain` says so.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest

# A schema names the fields a condition may use: a dict of field -> sub-schema, None for a value,
# and a "*" key for "any name at this level" (KPI names, metric names).
Schema = dict[str, Any]

ALLOWED = ("conditions may use and, or, not, comparisons (== != < <= > >= in, not in), + - * /, numbers, "
           "strings, true/false/null, lists for `in`, field names such as eval.kpis.tool_call.value or "
           "eval.kpis[\"tool_call\"], and min, max, abs, len")
MAX_LENGTH = 1000
MAX_DEPTH = 40  # nesting; keeps checking and evaluation (both recursive) far from Python's recursion limit

_CONSTANTS = {"true": True, "false": False, "null": None}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs, "len": len}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_REFUSED_WORDS = {
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.IfExp: "an if-expression",
    ast.Dict: "a dict", ast.Set: "a set", ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment (:=)",
    ast.Starred: "a starred argument", ast.Slice: "a slice", ast.Await: "await", ast.Is: "`is`",
    ast.IsNot: "`is not`", ast.Mod: "%", ast.Pow: "**", ast.FloorDiv: "//", ast.Invert: "~"}


@dataclass(frozen=True)
class Verdict:
    held: bool
    reason: str


@dataclass(frozen=True)
class Condition:
    """A parsed condition; `check` it against a run's results (nested dicts)."""

    text: str
    tree: ast.Expression

    def evaluate(self, context: Mapping[str, Any]) -> bool:
        return self.check(context).held

    def explain(self, context: Mapping[str, Any]) -> str:
        return self.check(context).reason

    def check(self, context: Mapping[str, Any]) -> Verdict:
        held, reason = _Evaluation(self.text, context).judge(self.tree.body)
        return Verdict(held, reason if len(reason) <= 600 else reason[:597] + "...")


def parse(text: str, param: str, schema: Schema) -> Condition:
    """The condition once every node is allowed and every field is in `schema`; else InvalidRequest
    naming `param`, the position and what is allowed."""
    text = text.strip()
    if not text or len(text) > MAX_LENGTH:
        raise InvalidRequest(f"a condition is 1 to {MAX_LENGTH} characters, e.g. eval.verdict == \"pass\"",
                             param=param)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        where = f" at column {err.offset}" if err.offset else ""
        raise InvalidRequest(f"`{text}` is not a condition: {err.msg}{where}; {ALLOWED}", param=param) from err
    if _depth(tree.body) > MAX_DEPTH:
        raise InvalidRequest(f"`{text[:60]}...` nests deeper than {MAX_DEPTH} levels; write a flatter condition",
                             param=param)
    _check(tree.body, text, param, schema)
    return Condition(text, tree)


def schema_error(path: Sequence[str | int], schema: Schema) -> str | None:
    """None when `path` names a field of `schema`; otherwise why not, listing what is there."""
    level: Schema | None = schema
    for depth, part in enumerate(path):
        if level is None and isinstance(part, int):
            continue  # a value may be a list
        if level is None:
            return f"{dotted(path[:depth])} is a value, not an object, so it has no field {part!r}"
        if isinstance(part, str) and part in level:
            level = level[part]
        elif "*" in level:
            level = level["*"]
        else:
            where = f"{dotted(path[:depth])} has" if depth else "the names available are"
            known = ", ".join(sorted(name for name in level if name != "*")) or "nothing"
            return f"{dotted(path[:depth + 1])} is not a field; {where}: {known}"
    return None


def dotted(path: Sequence[str | int]) -> str:
    """("eval", "kpis", "tool-call", 0) -> `eval.kpis["tool-call"][0]`."""
    text = ""
    for part in path:
        if isinstance(part, str) and part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def _check(node: ast.expr, text: str, param: str, schema: Schema) -> None:
    def refuse(what: str) -> InvalidRequest:
        line = f"line {node.lineno}, " if node.lineno > 1 else ""
        return InvalidRequest(f"`{text}` uses {what} at {line}column {node.col_offset + 1}; {ALLOWED}", param=param)

    if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        path = _path(node, refuse)
        if path[0] in _CONSTANTS and len(path) == 1:
            return
        if why := schema_error(path, schema):
            raise InvalidRequest(f"`{text}`: {why}", param=param)
        return
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, int | float | str | None):
            raise refuse(f"the constant {node.value!r}")
        return
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        if name not in _FUNCTIONS:
            raise refuse(f"a call to {name}(...)")
        if node.keywords or not node.args:
            raise refuse(f"{name}() without positional arguments")
        children: list[ast.expr] = list(node.args)
    elif isinstance(node, ast.BoolOp):
        children = list(node.values)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        children = [node.operand]
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        children = [node.left, node.right]
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        children = [node.left, *node.comparators]
    elif isinstance(node, ast.List | ast.Tuple):
        children = list(node.elts)
    else:
        operators = [getattr(node, "op", None), *getattr(node, "ops", [])]
        words = [_REFUSED_WORDS.get(type(op)) for op in operators if op is not None]
        raise refuse(next((w for w in words if w), None) or _REFUSED_WORDS.get(type(node), type(node).__name__))
    for child in children:
        _check(child, text, param, schema)


def _depth(root: ast.AST) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _path(node: ast.AST, refuse: Callable[[str], InvalidRequest]) -> list[str | int]:
    parts: list[str | int] = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if (isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub) and isinstance(key.operand, ast.Constant)
                    and type(key.operand.value) is int):
                key = ast.Constant(-key.operand.value)  # items[-1]
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str | int)
                    and not isinstance(key.value, bool)):
                raise refuse("a subscript that is not a constant name or index")
            parts.append(key.value)
        else:
            raise refuse("a field of something that is not a name")
        node = node.value  # type: ignore[attr-defined]
    parts.append(node.id)
    parts.reverse()
    if any(isinstance(part, str) and part.startswith("_") for part in parts):
        raise refuse("a name starting with _")
    return parts


class _Undefined(Exception):
    """A value missing at run time, or an operation on the wrong types: the comparison is false."""


class _Evaluation:
    def __init__(self, text: str, context: Mapping[str, Any]):
        self.text, self.context = text, context

    def judge(self, node: ast.AST) -> tuple[bool, str]:
        """Whether `node` holds, and why in a few words."""
        if isinstance(node, ast.BoolOp):
            reasons = []
            for operand in node.values:
                held, reason = self.judge(operand)
                if held == isinstance(node.op, ast.Or):
                    return held, reason
                reasons.append(reason)
            return not isinstance(node.op, ast.Or), " and ".join(reasons)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            held, reason = self.judge(node.operand)
            return not held, f"{reason}, so {self._source(node)} is {_word(not held)}"
        try:
            held = bool(self.value(node))
        except _Undefined as why:
            return False, f"{self._source(node)} is false ({why})"
        values = ", ".join(dict.fromkeys(self._shown(field) for field in _fields(node)))
        return held, f"{self._source(node)} is {_word(held)}" + (f" ({values})" if values else "")

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
            return self.lookup(node)
        if isinstance(node, ast.List | ast.Tuple):
            return [self.value(item) for item in node.elts]
        if isinstance(node, ast.BoolOp):
            result = None
            for operand in node.values:
                result = self.value(operand)
                if bool(result) == isinstance(node.op, ast.Or):
                    break
            return result
        try:
            if isinstance(node, ast.UnaryOp):
                return _UNARY[type(node.op)](self.value(node.operand))
            if isinstance(node, ast.BinOp):
                return _BINARY[type(node.op)](self.value(node.left), self.value(node.right))
            if isinstance(node, ast.Call):
                return _FUNCTIONS[node.func.id](*(self.value(arg) for arg in node.args))  # type: ignore[attr-defined]
        except ZeroDivisionError as err:
            raise _Undefined(f"{self._source(node)} divides by zero") from err
        except (TypeError, ValueError) as err:
            raise _Undefined(f"{self._source(node)} cannot be computed from values of these types") from err
        assert isinstance(node, ast.Compare)
        left = self.value(node.left)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.value(comparator)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError as err:
                raise _Undefined(f"cannot compare {_shown_value(left)} with {_shown_value(right)}") from err
            left = right
        return True

    def lookup(self, node: ast.AST) -> Any:
        path = _path(node, lambda what: InvalidRequest(what))
        current: Any = self.context
        for depth, part in enumerate(path):
            found = (part in current if isinstance(current, Mapping)
                     else isinstance(current, list) and isinstance(part, int) and -len(current) <= part < len(current))
            if found:
                current = current[part]
            else:
                raise _Undefined(f"{dotted(path[:depth + 1])} is missing")
        return current

    def _shown(self, field: ast.AST) -> str:
        try:
            return f"{self._source(field)} is {_shown_value(self.lookup(field))}"
        except _Undefined as why:
            return str(why)

    def _source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.unparse(node)


def _fields(node: ast.AST) -> list[ast.AST]:
    """The outermost field references inside `node`, in order."""
    if isinstance(node, ast.Attribute | ast.Subscript) or (isinstance(node, ast.Name) and node.id not in _CONSTANTS):
        return [node]
    if isinstance(node, ast.Call):
        return [field for arg in node.args for field in _fields(arg)]
    return [field for child in ast.iter_child_nodes(node) for field in _fields(child)]


def _word(held: bool) -> str:
    return "true" if held else "false"


def _shown_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
