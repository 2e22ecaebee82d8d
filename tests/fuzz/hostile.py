"""What the fuzzers put in a request besides what its schema generates: real ids of the seeded store (so a
call gets past `not_found`), and mutations an agent or an attacker sends (wrong types, unknown fields,
NaN and Infinity, huge numbers, empty strings, ids of the wrong kind)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

from hypothesis import strategies as st

HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 2**64, 10**30, 0.5, -0.0, 1e308, -1e308, 5e-324,
    float("nan"), float("inf"), float("-inf"), "", " ", "\x00", "NaN", "Infinity", "auto", "-1", "1e308", "true",
    "\u202egnp.exe", "../../../etc/passwd", "/etc/passwd", "x" * 5000, "job_", "mdl_0", "alias:", "alias:../x",
    [], [None], [""], [[]], {}, {"": None}, {"a": {"b": [1.5]}},
)
"""Values that are wrong somewhere in almost every field."""

MUTATIONS = ("huge", "replace", "non_finite", "unknown_field", "drop", "empty", "replace")
"""How a request is spoiled. Hypothesis favours the first (it is the simplest to it), so the first is the
mutation that finds most: numbers past what the store holds."""


def substitute_real(draw: st.DrawFn, value: Any, real: dict[str, list[Any]], share: float = 0.6) -> Any:
    """`value` with the fields named in `real` (at any depth) set to a real value of the store in about
    `share` of the places."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in real and _chance(draw, share):
                out[key] = copy.deepcopy(draw(st.sampled_from(real[key])))
            else:
                out[key] = substitute_real(draw, item, real, share)
        return out
    if isinstance(value, list):
        return [substitute_real(draw, item, real, share) for item in value]
    return value


def add_real_fields(draw: st.DrawFn, value: dict[str, Any], names: list[str], real: dict[str, list[Any]],
                    share: float = 0.4) -> dict[str, Any]:
    """Sets optional top-level fields the generator left out to real values, in about `share` of the cases."""
    for name in names:
        if name in real and name not in value and _chance(draw, share):
            value[name] = copy.deepcopy(draw(st.sampled_from(real[name])))
    return value


def _chance(draw: st.DrawFn, share: float) -> bool:
    return draw(st.integers(0, 99)) < share * 100


def mutate(draw: st.DrawFn, value: dict[str, Any], real: dict[str, list[Any]], fields: Sequence[str] = ()
           ) -> tuple[dict[str, Any], str]:
    """One mutation of a request (drawn from MUTATIONS) at a place drawn among all of its values and the
    top-level `fields` it left out."""
    kind = draw(st.sampled_from(MUTATIONS))
    value = copy.deepcopy(value)
    places = [*_places(value), *((value, name) for name in fields if name not in value)]
    if kind == "unknown_field":
        parent = draw(st.sampled_from([value, *[p for p, _ in places if isinstance(p, dict)]]))
        parent[draw(st.sampled_from(["bogus", "", "__proto__", "learning_rate", "job_id", "model_config"]))] = 1
        return value, kind
    if kind in ("huge", "non_finite"):  # aimed at numbers (and fields left out) where there are any
        places = [(p, k) for p, k in places if _numeric_or_absent(p, k)] or places
    if not places:
        return value, "none"
    parent, key = draw(st.sampled_from(places))
    if kind == "drop" and isinstance(parent, dict):
        parent.pop(key, None)
    else:
        parent[key] = draw(_replacement(kind, parent.get(key) if isinstance(parent, dict) else parent[key], real))
    return value, kind


def _numeric_or_absent(parent: Any, key: Any) -> bool:
    if isinstance(parent, dict) and key not in parent:
        return True
    return isinstance(parent[key], int | float) and not isinstance(parent[key], bool)


def _replacement(kind: str, old: Any, real: dict[str, list[Any]]) -> st.SearchStrategy[Any]:
    if kind == "non_finite":
        return st.sampled_from([float("nan"), float("inf"), float("-inf")])
    if kind == "huge":
        return st.sampled_from([2**63, 10**30, 2**64, -(2**63) - 1, 1e308, -1e308, 10**300])
    if kind == "empty":
        return st.sampled_from(["", " ", [], {}, None])
    every_real = [v for values in real.values() for v in values]
    return st.one_of(st.sampled_from(HOSTILE), st.sampled_from(every_real), _same_kind_of_wrong(old))


def _same_kind_of_wrong(old: Any) -> st.SearchStrategy[Any]:
    """A value of the right type at its edge: a bool where an int goes, a negative or fractional number."""
    if isinstance(old, bool):
        return st.sampled_from([0, 1, "yes"])
    if isinstance(old, int):
        return st.one_of(st.booleans(), st.integers(), st.just(float(old) + 0.5))
    if isinstance(old, float):
        return st.one_of(st.floats(), st.just(str(old)))
    if isinstance(old, str):
        return st.one_of(st.text(max_size=40), st.just(old * 50), st.just(old.upper()))
    return st.just([old])


def _places(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) inside `value`, depth first."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = list(enumerate(value))
    else:
        return
    for key, item in pairs:
        yield value, key
        yield from _places(item)
