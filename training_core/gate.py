"""The regression gate: is a candidate worse than its baseline on a KPI, by more than is allowed?

Both models are scored on the same items, so every test is paired:

- pass/fail KPIs on independent items: the exact McNemar test (a binomial test on the discordant
  pairs) for the p-value, and the Agresti-Min interval (a Wald interval after adding half an item
  to each cell) for the difference in pass rates, which holds its coverage on small sets where the
  plain Wald interval is far too narrow;
- continuous KPIs, and any KPI whose items carry a cluster key: a paired bootstrap of the
  difference of the KPI's aggregate, whose standard error gives a t interval and p-value with
  (clusters - 1) degrees of freedom. With clusters, whole clusters are resampled, because items
  from one source are not independent and treating them so makes intervals too narrow (the null
  simulation in the tests keeps the false-positive rate near 5% this way).

The verdict uses the direction-adjusted difference d (positive = candidate better) and the allowed
regression m >= 0: `fail` when the whole 95% interval lies below -m, `pass` when it lies above
-m, `inconclusive` otherwise. With m = 0 the verdict also needs p < 0.05, so the interval and the
test never disagree. A set too small to detect a regression of m (80% power, two-sided 5%, normal
approximation with the clusters' design effect) is flagged with the number of items it would need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_SAMPLES = 2000
AGGREGATIONS = {
    "mean": lambda a, axis=-1: np.mean(a, axis=axis),
    "median": lambda a, axis=-1: np.median(a, axis=axis),
    "p10": lambda a, axis=-1: np.percentile(a, 10, axis=axis),
    "p90": lambda a, axis=-1: np.percentile(a, 90, axis=axis),
}


@dataclass
class GateResult:
    candidate: float
    baseline: float
    delta: float
    """candidate - baseline in the KPI's own units (negative is worse only for `higher` KPIs)."""
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    verdict: str
    items: int
    clusters: int
    items_needed: int | None
    """Items that would detect a regression of `allowed_regression`; None when the set suffices or
    it cannot be said (no allowed regression, no variation)."""
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare(candidate: Sequence[float], baseline: Sequence[float], *, pass_fail: bool, direction: str = "higher",
            aggregation: str = "mean", allowed_regression: float = 0.0,
            clusters: Sequence[str | None] | None = None, seed: int = 0) -> GateResult:
    """The gate for one KPI over paired per-item scores."""
    cand, base = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if cand.shape != base.shape or cand.size == 0:
        raise ValueError(f"paired scores needed: {cand.size} candidate and {base.size} baseline items")
    groups = _cluster_index(clusters, cand.size)
    clustered = groups.max() + 1 < cand.size
    sign = 1.0 if direction == "higher" else -1.0
    aggregate = AGGREGATIONS[aggregation]
    delta = float(aggregate(cand) - aggregate(base))

    if pass_fail and aggregation == "mean" and not clustered:
        test = "mcnemar_exact"
        low, high, p_value = _mcnemar(cand, base)
    else:
        test = "cluster_bootstrap" if clustered else "paired_bootstrap"
        low, high, p_value = _bootstrap(cand, base, groups, aggregate, seed)
        if pass_fail and low == high:
            # No item differs, so resampling sees no spread at all, and a zero-width interval would pass
            # any margin; the Agresti-Min interval keeps a width that shrinks only with more items.
            test = "mcnemar_exact"
            low, high, p_value = _mcnemar(cand, base)
    d_low, d_high = sorted((sign * low, sign * high))
    margin = allowed_regression
    significant = margin > 0 or p_value < ALPHA
    needed = items_needed(cand - base, groups, margin)
    if d_high < -margin and significant:
        verdict = "fail"
    elif d_low > -margin and significant:
        verdict = "pass"
    else:
        verdict = "inconclusive"
    note = None
    if needed is not None and needed > cand.size:
        note = (f"{cand.size} items cannot detect a regression of {margin:g}; about {needed} would "
                f"(80% power, 5% two-sided)")
    elif margin == 0 and verdict == "inconclusive":
        note = "allowed_regression is 0: only a significant difference gives a verdict; set a margin"
    return GateResult(candidate=float(aggregate(cand)), baseline=float(aggregate(base)), delta=delta,
                      ci_low=low, ci_high=high, p_value=p_value, test=test, verdict=verdict, items=int(cand.size),
                      clusters=int(groups.max() + 1), items_needed=needed if needed and needed > cand.size else None,
                      note=note)


def items_needed(differences: np.ndarray, groups: np.ndarray, margin: float) -> int | None:
    """Paired items to detect a mean shift of `margin` (normal approximation, design effect for
    clusters); None when no margin is set or the differences do not vary."""
    if margin <= 0 or differences.size < 2:
        return None
    sd = float(np.std(differences, ddof=1))
    if sd == 0:
        return None
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    return math.ceil((z * sd / margin) ** 2 * _design_effect(differences, groups))


def _mcnemar(cand: np.ndarray, base: np.ndarray) -> tuple[float, float, float]:
    n = cand.size
    better = int(np.sum((cand >= 0.5) & (base < 0.5)))
    worse = int(np.sum((cand < 0.5) & (base >= 0.5)))
    discordant = better + worse
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(better, discordant, 0.5).pvalue)
    b, c, m = better + 0.5, worse + 0.5, n + 2.0  # Agresti & Min (2005): half an item in each cell
    diff = (b - c) / m
    se = math.sqrt(max(b + c - (b - c) ** 2 / m, 0.0)) / m
    z = stats.norm.ppf(1 - ALPHA / 2)
    return float(diff - z * se), float(diff + z * se), p_value


def _bootstrap(cand: np.ndarray, base: np.ndarray, groups: np.ndarray, aggregate: Any,
               seed: int) -> tuple[float, float, float]:
    """Percentile interval and two-sided p-value of the aggregate's difference, resampling clusters."""
    rng = np.random.default_rng(seed)
    count = int(groups.max() + 1)
    members = [np.flatnonzero(groups == g) for g in range(count)]
    picks = rng.integers(0, count, size=(BOOTSTRAP_SAMPLES, count))
    if aggregate is AGGREGATIONS["mean"]:  # a mean needs only each cluster's sum and size: vectorised
        times = np.stack([np.bincount(row, minlength=count) for row in picks])
        sums = np.bincount(groups, weights=cand - base, minlength=count)
        deltas = (times @ sums) / (times @ np.bincount(groups, minlength=count))
    else:
        deltas = np.empty(BOOTSTRAP_SAMPLES)
        for row, chosen in enumerate(picks):
            index = np.concatenate([members[g] for g in chosen])
            deltas[row] = aggregate(cand[index]) - aggregate(base[index])
    delta = float(aggregate(cand) - aggregate(base))
    # The bootstrap's spread understates the standard error by sqrt((G-1)/G) with G clusters, and
    # percentile intervals are too narrow with few clusters: correct the one, use t with G-1 degrees
    # of freedom for the other (the null simulation showed 8% false positives without, 5% with).
    se = float(np.std(deltas, ddof=1)) * math.sqrt(count / max(count - 1, 1))
    if se == 0:
        return delta, delta, 1.0 if delta == 0 else 0.0
    dof = max(count - 1, 1)
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * se
    p_value = float(2 * stats.t.sf(abs(delta) / se, dof))
    return delta - half, delta + half, p_value


def _cluster_index(clusters: Sequence[str | None] | None, n: int) -> np.ndarray:
    """One integer per item; an item without a cluster key is its own cluster."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster keys for {n} items")
    ids: dict[str, int] = {}
    out = np.empty(n, dtype=int)
    for i, key in enumerate(clusters):
        out[i] = ids.setdefault(f"\0{i}" if key is None else key, len(ids))
    return out


def _design_effect(values: np.ndarray, groups: np.ndarray) -> float:
    """Variance of the mean under clustering over that under independence (1 without clusters)."""
    count = int(groups.max() + 1)
    if count == values.size or count < 2:
        return 1.0
    centred = values - values.mean()
    sums = np.bincount(groups, weights=centred, minlength=count)
    clustered = float(np.sum(sums ** 2))
    independent = float(np.sum(centred ** 2))
    return max(1.0, clustered / independent) if independent > 0 else 1.0
