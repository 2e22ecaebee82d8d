"""Drift: is new data unlike the data a model was trained on, and has a KPI left its usual range?

Data drift has two measures, each with the threshold common practice uses:

- the Jensen-Shannon distance (base 2, so 0 to 1) between the word-frequency distributions of the
  two texts, less what chance alone gives between random halves of the pooled records (see
  `js_distance`): above 0.1 is drift;
- a domain classifier: a logistic regression on hashed word uni- and bigrams, trained to tell the
  two sets apart and scored out of fold (5-fold cross-validation), reported as its ROC AUC: 0.5
  when the sets cannot be told apart, above 0.55 is drift.

Words, not a model's tokens: drift is about the data, and this way no tokenizer is loaded. The
logistic regression is a few lines of numpy (L2-regularised, full-batch gradient descent on at
most `MAX_RECORDS` a side) rather than scikit-learn, which would be a large dependency for one fit.

KPI drift: a value outside the mean +- 3 standard deviations of the same KPI in earlier reports
(at least `MIN_HISTORY` of them) is drift.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
from scipy import sparse
from scipy.spatial.distance import jensenshannon
from scipy.stats import rankdata

JS_THRESHOLD = 0.1
AUC_THRESHOLD = 0.55
MIN_HISTORY = 3
MAX_RECORDS = 2000
FEATURES = 2 ** 16
FOLDS = 5
SPLITS = 5
_WORD = re.compile(r"\w+", re.UNICODE)


def data_drift(reference: Sequence[str], current: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Both measures between two sets of texts, and whether either crosses its threshold."""
    if len(reference) < FOLDS or len(current) < FOLDS:
        raise ValueError(f"drift needs at least {FOLDS} records a side (got {len(reference)} and {len(current)})")
    rng = np.random.default_rng(seed)
    reference, current = _sample(reference, rng), _sample(current, rng)
    distance, raw = js_distance(reference, current, seed)
    auc = domain_auc(reference, current, seed)
    return {"js_distance": round(distance, 4), "js_distance_raw": round(raw, 4), "js_threshold": JS_THRESHOLD,
            "domain_auc": round(auc, 4), "auc_threshold": AUC_THRESHOLD,
            "drifted": distance > JS_THRESHOLD or auc > AUC_THRESHOLD,
            "records": {"reference": len(reference), "current": len(current)},
            "top_shifted_words": shifted_words(reference, current)}


def js_distance(reference: Sequence[str], current: Sequence[str], seed: int = 0) -> tuple[float, float]:
    """(bias-corrected distance, raw distance). Word frequencies estimated from finite samples
    differ by chance, so even two halves of one corpus have a raw distance well above 0 (0.12 for
    200 short records each in our tests). The expected chance part is measured by splitting the
    pooled records at random (`SPLITS` times) and taken off the divergence (the squared distance)."""
    raw = _js(Counter(_words_of(reference)), Counter(_words_of(current)))
    pooled = [Counter(_WORD.findall(text.lower())) for text in (*reference, *current)]
    rng = np.random.default_rng(seed)
    chance = []
    for _ in range(SPLITS):
        order = rng.permutation(len(pooled))
        left, right = Counter[str](), Counter[str]()
        for rank, index in enumerate(order):
            (left if rank < len(reference) else right).update(pooled[index])
        chance.append(_js(left, right) ** 2)
    return float(np.sqrt(max(0.0, raw ** 2 - float(np.mean(chance))))), raw


def _js(left: Counter[str], right: Counter[str]) -> float:
    vocabulary = sorted(left.keys() | right.keys())
    p = np.array([left[w] for w in vocabulary], dtype=float)
    q = np.array([right[w] for w in vocabulary], dtype=float)
    if p.sum() == 0 or q.sum() == 0:
        return 1.0 if p.sum() != q.sum() else 0.0
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def domain_auc(reference: Sequence[str], current: Sequence[str], seed: int = 0) -> float:
    """Out-of-fold ROC AUC of a classifier telling `current` (1) from `reference` (0)."""
    features = _hashed([*reference, *current])
    labels = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    folds = np.random.default_rng(seed).permutation(len(labels)) % FOLDS
    scores = np.empty(len(labels))
    for fold in range(FOLDS):
        test = folds == fold
        weights = _fit_logistic(features[~test], labels[~test])
        scores[test] = features[test] @ weights[:-1] + weights[-1]
    return roc_auc(labels, scores)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The Mann-Whitney form of the AUC (ties count half)."""
    ranks = rankdata(scores)
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def shifted_words(reference: Sequence[str], current: Sequence[str], top: int = 5) -> list[dict[str, Any]]:
    """Words whose share changed most: what an agent reads first when drift is found."""
    left, right = Counter(_words_of(reference)), Counter(_words_of(current))
    total_left, total_right = max(sum(left.values()), 1), max(sum(right.values()), 1)
    change = {w: right[w] / total_right - left[w] / total_left for w in left.keys() | right.keys()}
    ranked = sorted(change, key=lambda w: -abs(change[w]))[:top]
    return [{"word": w, "reference_share": round(left[w] / total_left, 4),
             "current_share": round(right[w] / total_right, 4)} for w in ranked]


def kpi_drift(history: Sequence[float], value: float) -> dict[str, Any] | None:
    """The value against the mean +- 3 sd of earlier values; None with too little history."""
    if len(history) < MIN_HISTORY:
        return None
    mean, sd = float(np.mean(history)), float(np.std(history, ddof=1))
    low, high = mean - 3 * sd, mean + 3 * sd
    return {"value": value, "mean": round(mean, 6), "sd": round(sd, 6), "low": round(low, 6),
            "high": round(high, 6), "history": len(history), "drifted": not (low <= value <= high)}


def _sample(texts: Sequence[str], rng: np.random.Generator) -> list[str]:
    if len(texts) <= MAX_RECORDS:
        return list(texts)
    return [texts[i] for i in sorted(rng.choice(len(texts), MAX_RECORDS, replace=False))]


def _words_of(texts: Sequence[str]) -> list[str]:
    return [w for text in texts for w in _WORD.findall(text.lower())]


def _hashed(texts: Sequence[str]) -> sparse.csr_matrix:
    """Rows of L2-normalised counts of word uni- and bigrams hashed into FEATURES buckets (crc32:
    stable across processes, unlike `hash`)."""
    rows, columns = [], []
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        for gram in (*words, *(f"{a} {b}" for a, b in pairwise(words))):
            rows.append(row)
            columns.append(zlib.crc32(gram.encode("utf-8")) % FEATURES)
    counts = sparse.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(texts), FEATURES))
    counts.sum_duplicates()
    norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
    return sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ counts


def _fit_logistic(features: sparse.csr_matrix, labels: np.ndarray, l2: float = 1e-3, steps: int = 300,
                  rate: float = 4.0) -> np.ndarray:
    """Weights (bias last) of an L2-regularised logistic regression by gradient descent; the
    feature rows have unit length, so a fixed step size converges."""
    weights, bias = np.zeros(features.shape[1]), 0.0
    transposed = features.T.tocsr()
    for _ in range(steps):
        predicted = 1.0 / (1.0 + np.exp(-(features @ weights + bias)))
        error = (predicted - labels) / len(labels)
        weights -= rate * (transposed @ error + l2 * weights)
        bias -= rate * float(error.sum())
    return np.r_[weights, bias]
