"""Drift: is new data unlike the data a model was trained on, and has a KPI left its usual range?

Data drift has two measures, each with the threshold common practice uses:

- the Jensen-Shannon distance (base 2, so 0 to 1) between the word-frequency distributions of the
  two texts, less what chance alone gives between random halves of the pooled records (see
  `js_distance`): above 0.1 is drift;
- a domain classifier: scikit-learn's logistic regression on tf-idf weighted, hashed word uni- and
  bigrams, trained to tell the two sets apart and scored by 5-fold stratified cross-validation,
  reported as its ROC AUC: 0.5 when the sets cannot be told apart, above 0.55 is drift.

The classifier only sees records that are in one set alone, each once. A record present in both
sets lands in both classes: trained on one copy, the classifier scores the other as the opposite
class, so shared records drive the AUC far below 0.5 (0.046 was seen), which says "broken", not
"no drift". Shared records are counted instead and reported as `overlap` (for an eval suite
against training data: contamination, its scores flatter the model), and `auc_reading` says in
words what the AUC means, including when it cannot be measured.

Words, not a model's tokens: drift is about the data, and this way no tokenizer is loaded.

KPI drift: a value outside the mean +- 3 standard deviations of the same KPI in earlier reports
(at least `MIN_HISTORY` of them) is drift.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon

JS_THRESHOLD = 0.1
AUC_THRESHOLD = 0.55
AUC_BROKEN = 0.45
"""An AUC below this is worse than chance: the classifier is misled, which is no evidence either way."""
MIN_HISTORY = 3
MAX_RECORDS = 2000
FEATURES = 2 ** 16
FOLDS = 5
SPLITS = 5
_WORD = re.compile(r"\w+", re.UNICODE)


def data_drift(reference: Sequence[str], current: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Both measures between two sets of texts, their overlap, and whether either measure crosses
    its threshold."""
    if len(reference) < FOLDS or len(current) < FOLDS:
        raise ValueError(f"drift needs at least {FOLDS} records a side (got {len(reference)} and {len(current)})")
    rng = np.random.default_rng(seed)
    reference, current = _sample(reference, rng), _sample(current, rng)
    # The word distributions are compared whole: records both sets hold make them alike, rightly.
    distance, raw = js_distance(reference, current, seed)
    reference_keys, current_keys = [_key(text) for text in reference], [_key(text) for text in current]
    shared = set(reference_keys) & set(current_keys)
    only_reference = _distinct(reference, reference_keys, shared)
    only_current = _distinct(current, current_keys, shared)
    measurable = len(only_reference) >= FOLDS and len(only_current) >= FOLDS
    auc = domain_auc(only_reference, only_current, seed) if measurable else None
    overlap = {"shared_records": len(shared),
               "reference_share": round(sum(k in shared for k in reference_keys) / len(reference), 4),
               "current_share": round(sum(k in shared for k in current_keys) / len(current), 4),
               "flagged": bool(shared)}
    return {"js_distance": round(distance, 4), "js_distance_raw": round(raw, 4), "js_threshold": JS_THRESHOLD,
            "domain_auc": None if auc is None else round(auc, 4), "auc_threshold": AUC_THRESHOLD,
            "auc_reading": _auc_reading(auc, overlap, len(only_reference), len(only_current)),
            "overlap": overlap,
            "drifted": distance > JS_THRESHOLD or (auc is not None and auc > AUC_THRESHOLD),
            "records": {"reference": len(reference), "current": len(current),
                        "reference_only": len(only_reference), "current_only": len(only_current)},
            "top_shifted_words": shifted_words(reference, current)}


def _auc_reading(auc: float | None, overlap: dict[str, Any], only_reference: int, only_current: int) -> str:
    """What the domain AUC means here, in one or two sentences an agent can act on."""
    shared = ""
    if overlap["flagged"]:
        shared = (f"{overlap['shared_records']} distinct records are in both sets ({overlap['reference_share']:.0%} "
                  f"of the reference, {overlap['current_share']:.0%} of the current records); the classifier "
                  "compares only the records in one set alone, as shared ones would defeat it. ")
    if auc is None:
        return shared + (f"Not measured: {only_reference} and {only_current} distinct records are in one set alone, "
                         f"fewer than the {FOLDS} a side a cross-validated classifier needs; judge by the JS distance.")
    if auc > AUC_THRESHOLD:
        return shared + f"Above {AUC_THRESHOLD}: a classifier tells the sets apart, so the data has drifted."
    if auc >= AUC_BROKEN:
        return shared + "Near 0.5: a classifier cannot tell the sets apart, so no drift by this measure."
    return shared + (f"Below {AUC_BROKEN}, worse than chance: not a sign of no drift but of a misled classifier, "
                     "most likely near-duplicates across the sets (records that differ only slightly) or too few "
                     "records; judge by the JS distance.")


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
    """Mean ROC AUC over stratified folds of a classifier telling `current` (1) from `reference` (0).

    Give it records in one set alone (see `data_drift`): a record in both would be in both classes.
    """
    # scikit-learn takes a second to import, and the service imports this module when it starts.
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from threadpoolctl import threadpool_limits

    # Hashing needs no vocabulary fitted on the held-out fold; idf weights are fitted per fold.
    classifier = make_pipeline(
        HashingVectorizer(ngram_range=(1, 2), n_features=FEATURES, alternate_sign=False, norm=None,
                          token_pattern=_WORD.pattern, lowercase=True),
        TfidfTransformer(sublinear_tf=True),
        LogisticRegression(C=1.0, solver="liblinear"))
    labels = np.r_[np.zeros(len(reference), dtype=int), np.ones(len(current), dtype=int)]
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    # liblinear makes many tiny BLAS calls; with BLAS threads on busy cores each one waits on the
    # others (a fit took 1.2 s instead of 0.04 s on two loaded cores).
    with threadpool_limits(limits=1, user_api="blas"):
        scores = cross_val_score(classifier, [*reference, *current], labels, scoring="roc_auc", cv=folds)
    return float(np.mean(scores))


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


def _key(text: str) -> str:
    """A record's identity for overlap: its words, so case, spacing and punctuation aside."""
    return " ".join(_WORD.findall(text.lower()))


def _distinct(texts: Sequence[str], keys: list[str], shared: set[str]) -> list[str]:
    """Each record not in `shared` once: a record repeated within one set would sit in the
    classifier's training and test folds at once and flatter it."""
    seen: set[str] = set()
    kept = []
    for text, key in zip(texts, keys, strict=True):
        if key not in shared and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept
