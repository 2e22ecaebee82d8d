"""The regression gate's statistics: pure numbers, no models."""

from __future__ import annotations

import numpy as np
from scipy import stats

from training_core import gate


def _paired_rates(n: int, baseline_rate: float, candidate_rate: float, seed: int) -> tuple[list[float], list[float]]:
    """Pass/fail scores on the same items; the candidate's differs from the baseline's on a share of them."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < baseline_rate).astype(float)
    cand = base.copy()
    flip = rng.random(n)
    shift = candidate_rate - baseline_rate
    if shift > 0:
        cand[(base == 0) & (flip < shift / (1 - baseline_rate))] = 1.0
    else:
        cand[(base == 1) & (flip < -shift / baseline_rate)] = 0.0
    return cand.tolist(), base.tolist()


def test_candidate_improved_by_design_passes_the_gate() -> None:
    cand, base = _paired_rates(300, 0.5, 0.7, seed=1)
    result = gate.compare(cand, base, pass_fail=True, allowed_regression=0.02)
    assert result.test == "mcnemar_exact"
    assert result.delta > 0.1 and result.ci_low > -0.02
    assert result.verdict == "pass"
    assert result.p_value < 0.001


def test_candidate_degraded_by_design_fails_the_gate() -> None:
    cand, base = _paired_rates(300, 0.7, 0.5, seed=2)
    result = gate.compare(cand, base, pass_fail=True, allowed_regression=0.02)
    assert result.verdict == "fail"
    assert result.ci_high < -0.02 and result.p_value < 0.001


def test_continuous_kpi_where_lower_is_better_uses_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(3)
    base = rng.lognormal(2.0, 0.3, size=200)
    worse = base * 1.3 + rng.normal(0, 0.2, size=200)  # perplexity up 30%: a regression
    result = gate.compare(worse, base, pass_fail=False, direction="lower", aggregation="median",
                          allowed_regression=0.5)
    assert result.test == "paired_bootstrap"
    assert result.delta > 0 and result.verdict == "fail"
    better = gate.compare(base * 0.8, base, pass_fail=False, direction="lower", allowed_regression=0.5)
    assert better.verdict == "pass"


def test_a_five_item_suite_is_inconclusive_and_says_how_many_items_it_needs() -> None:
    cand, base = [1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0, 0.0]
    result = gate.compare(cand, base, pass_fail=True, allowed_regression=0.05)
    assert result.verdict == "inconclusive"
    assert result.items_needed is not None and result.items_needed > 5
    assert "cannot detect a regression of 0.05" in (result.note or "")


def test_mcnemar_p_value_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    cand = [1.0] * 9 + [0.0] * 2 + [1.0] * 20
    base = [0.0] * 9 + [1.0] * 2 + [1.0] * 20
    result = gate.compare(cand, base, pass_fail=True)
    assert result.p_value == stats.binomtest(9, 11, 0.5).pvalue
    assert abs(result.delta - 7 / 31) < 1e-12


def test_clustered_items_are_resampled_by_cluster() -> None:
    cand, base = _paired_rates(60, 0.5, 0.7, seed=4)
    clusters = [f"doc{i // 6}" for i in range(60)]
    result = gate.compare(cand, base, pass_fail=True, clusters=clusters)
    assert result.test == "cluster_bootstrap" and result.clusters == 10


def test_null_comparisons_with_clustered_items_keep_false_positives_within_7_percent() -> None:
    """200 comparisons of two equally good models on 40 clusters of 2-6 items. Items of one cluster
    share a difficulty, and each cluster favours one model or the other by a zero-mean amount: that
    second part is what makes item-level tests overconfident (18% false positives for continuous
    KPIs in benchmarks/eval_gate.py). The gate may flag at most 7% (5% nominal)."""
    rng = np.random.default_rng(0)
    for pass_fail in (True, False):
        positives = 0
        for trial in range(200):
            clusters, cand, base = [], [], []
            for cluster, size in enumerate(rng.integers(2, 7, size=40)):
                difficulty, preference = rng.normal(0.0, 1.0), rng.normal(0.0, 0.5)
                for _ in range(size):
                    clusters.append(f"c{cluster}")
                    if pass_fail:
                        base.append(float(rng.random() < 1 / (1 + np.exp(-difficulty))))
                        cand.append(float(rng.random() < 1 / (1 + np.exp(-(difficulty + preference)))))
                    else:
                        base.append(difficulty + rng.normal(0, 0.5))
                        cand.append(difficulty + preference + rng.normal(0, 0.5))
            result = gate.compare(cand, base, pass_fail=pass_fail, clusters=clusters, seed=trial)
            positives += result.verdict != "inconclusive"
        assert positives / 200 <= 0.07, f"pass_fail={pass_fail}: {positives} of 200 null comparisons flagged"


def test_identical_pass_fail_scores_on_few_clustered_items_do_not_pass_a_tight_margin() -> None:
    scores = [0.0] * 24
    result = gate.compare(scores, scores, pass_fail=True, allowed_regression=0.05,
                          clusters=[f"c{i % 6}" for i in range(24)])
    assert result.verdict == "inconclusive" and result.ci_low < -0.05
