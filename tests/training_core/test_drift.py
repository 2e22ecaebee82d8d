"""Drift measures on texts: pure numbers, no models."""

from __future__ import annotations

import random

from training_core import drift


def _support_tickets(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    subjects = ["router", "modem", "splice cabinet", "ticket", "customer", "fibre", "light level", "ONT"]
    states = ["is down", "needs a reseat", "waits on the field team", "shows red", "was reset", "is PARKED"]
    return [f"The {rng.choice(subjects)} {rng.choice(states)} at site {rng.randint(1, 60)}." for _ in range(n)]


def _recipes(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    steps = ["Whisk the eggs", "Fold in the flour", "Bake for twenty minutes", "Season with salt", "Simmer the sauce"]
    return [f"{rng.choice(steps)} and serve with {rng.choice(['rice', 'bread', 'salad'])} for {rng.randint(2, 8)}."
            for _ in range(n)]


def test_drift_is_found_between_two_different_corpora() -> None:
    found = drift.data_drift(_support_tickets(300, 1), _recipes(300, 2))
    assert found["drifted"]
    assert found["js_distance"] > drift.JS_THRESHOLD and found["domain_auc"] > 0.9
    assert {w["word"] for w in found["top_shifted_words"]} & {"site", "with", "serve", "the", "and", "at", "for"}


def test_no_drift_between_two_halves_of_one_corpus() -> None:
    corpus = _support_tickets(600, 3)
    found = drift.data_drift(corpus[:300], corpus[300:])
    assert not found["drifted"], found
    assert found["domain_auc"] <= drift.AUC_THRESHOLD
    # Chance alone puts the raw distance of finite samples above zero; the corrected one is near it.
    assert found["js_distance"] < found["js_distance_raw"]


def test_a_shift_in_mix_within_one_domain_is_found() -> None:
    tickets = _support_tickets(400, 4)
    mixed = [t for t in _support_tickets(1200, 5) if "router" in t or "modem" in t][:300]
    assert drift.data_drift(tickets, mixed)["drifted"]


def test_kpi_outside_three_standard_deviations_of_its_history_is_drift() -> None:
    history = [0.71, 0.73, 0.72, 0.70, 0.72]
    assert not drift.kpi_drift(history, 0.715)["drifted"]
    assert drift.kpi_drift(history, 0.55)["drifted"]
    assert drift.kpi_drift(history[:2], 0.1) is None


def test_records_both_sets_share_are_reported_as_overlap_not_read_as_a_broken_auc() -> None:
    corpus = _support_tickets(600, 7)
    shared = corpus[:200]
    found = drift.data_drift(shared + corpus[200:300], shared + corpus[300:400])
    overlap = found["overlap"]
    assert overlap["flagged"] and overlap["shared_records"] >= 150
    assert 0.6 < overlap["reference_share"] < 0.8 and 0.6 < overlap["current_share"] < 0.8
    # The shared records defeated the classifier (an AUC of 0.34 here); without them it is near chance.
    assert found["domain_auc"] >= drift.AUC_BROKEN and not found["drifted"]
    assert "in both sets" in found["auc_reading"] and "no drift" in found["auc_reading"]
    assert found["records"]["reference_only"] < 100 and found["records"]["current_only"] < 100


def test_a_shift_in_mix_behind_many_shared_records_is_still_found() -> None:
    shared = _support_tickets(200, 7)
    tickets = _support_tickets(100, 4)
    mixed = [t for t in _support_tickets(1200, 5) if "router" in t or "modem" in t][:100]
    found = drift.data_drift(shared + tickets, shared + mixed)
    assert found["js_distance"] <= drift.JS_THRESHOLD  # the shared records hide it from the word counts
    assert found["domain_auc"] > drift.AUC_THRESHOLD and found["drifted"]
    assert found["overlap"]["flagged"] and "drifted" in found["auc_reading"]


def test_identical_sets_are_no_drift_and_the_classifier_says_it_could_not_be_measured() -> None:
    corpus = _support_tickets(200, 8)
    found = drift.data_drift(corpus, list(reversed(corpus)))
    assert found["overlap"]["reference_share"] == found["overlap"]["current_share"] == 1.0
    assert found["domain_auc"] is None and not found["drifted"]
    assert found["auc_reading"].split(". ")[-1].startswith("Not measured")
