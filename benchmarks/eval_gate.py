"""How the regression gate behaves: false positives under the null, and power, on clustered items.

    python benchmarks/eval_gate.py [COMPARISONS]

For pass/fail and continuous KPIs, on 40 clusters of 2 to 6 items that share a difficulty and a
zero-mean preference for one of the models, prints
one JSON line each: the share of null comparisons (two equally good models) where the gate gives a
verdict other than `inconclusive` (nominal 5%), the same share when the clusters are ignored
(what an item-level test would claim), and the share of comparisons that detect a real
regression (10 points of pass rate, or 0.25 sd). Also times `data_drift` on 2 x 2,000 records.
"""

from __future__ import annotations

import json
import random
import sys
import time

import numpy as np

from training_core import drift, gate


def sample(rng: np.random.Generator, pass_fail: bool, shift: float) -> tuple[list[float], list[float], list[str]]:
    clusters, cand, base = [], [], []
    for cluster, size in enumerate(rng.integers(2, 7, size=40)):
        # Each source is harder or easier for both models, and favours one model or the other by a
        # zero-mean amount: the second is what makes item-level tests overconfident.
        difficulty, preference = rng.normal(0.0, 1.0), rng.normal(0.0, 0.5)
        for _ in range(size):
            clusters.append(f"c{cluster}")
            if pass_fail:
                p_base = 1 / (1 + np.exp(-difficulty))
                p_cand = 1 / (1 + np.exp(-(difficulty + preference)))
                base.append(float(rng.random() < p_base))
                cand.append(float(rng.random() < max(0.0, p_cand - shift)))
            else:
                base.append(difficulty + rng.normal(0, 0.5))
                cand.append(difficulty + preference - shift + rng.normal(0, 0.5))
    return cand, base, clusters


def main(comparisons: int) -> None:
    rng = np.random.default_rng(0)
    for pass_fail, shift in ((True, 0.10), (False, 0.25)):
        flagged = flagged_iid = detected = 0
        for trial in range(comparisons):
            cand, base, clusters = sample(rng, pass_fail, 0.0)
            verdict = gate.compare(cand, base, pass_fail=pass_fail, clusters=clusters, seed=trial).verdict
            flagged += verdict != "inconclusive"
            flagged_iid += gate.compare(cand, base, pass_fail=pass_fail, seed=trial).verdict != "inconclusive"
            cand, base, clusters = sample(rng, pass_fail, shift)
            detected += gate.compare(cand, base, pass_fail=pass_fail, clusters=clusters, seed=trial).verdict == "fail"
        print(json.dumps({"kpi": "pass_fail" if pass_fail else "continuous", "comparisons": comparisons,
                          "false_positive_rate": flagged / comparisons,
                          "false_positive_rate_ignoring_clusters": flagged_iid / comparisons,
                          "regression": shift, "power": detected / comparisons}))
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(random.Random(i).choices(words, k=30)) for i in range(4000)]
    started = time.perf_counter()
    found = drift.data_drift(texts[:2000], texts[2000:])
    print(json.dumps({"drift_records": 4000, "seconds": round(time.perf_counter() - started, 2),
                      "js_distance": found["js_distance"], "domain_auc": found["domain_auc"]}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
