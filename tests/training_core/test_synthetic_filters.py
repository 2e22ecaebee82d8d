"""The synth filters on planted records: duplicates, eval items and broken traces are dropped."""

from __future__ import annotations

import json
import random
import re
from typing import Any

from training_core.synthetic.filters import RecordFilters, check_trace, record_text
from training_core.synthetic.tasks import corrupt

FILTERS = {"min_chars": 1, "max_chars": 20_000, "near_duplicate": 0.7, "diversity_rouge_l": None}
TOOLS = [{"name": "lookup_ticket", "parameters": {
    "type": "object", "required": ["ticket_id"], "additionalProperties": False,
    "properties": {"ticket_id": {"type": "string", "pattern": "^T[0-9]+$"}}}}]


def _pc(prompt: str, completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion, "metadata": {}}


def _trace(name: str, arguments: dict[str, Any], answered: bool = True) -> dict[str, Any]:
    messages = [{"role": "user", "content": "What is the state of ticket T42?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}]
    if answered:
        messages.append({"role": "tool", "name": name, "content": '{"state": "PARKED"}'})
    messages.append({"role": "assistant", "content": "Ticket T42 is PARKED: it waits on the customer."})
    return {"messages": messages, "metadata": {}}


LONG = ("The field team walks out to the splice cabinet listed in the Gridbook and reseats the customer's "
        "optical terminal before the quiet window closes at four in the morning")


def test_planted_exact_and_near_duplicates_are_removed_and_distinct_records_kept() -> None:
    filters = RecordFilters(FILTERS, None, [])
    records = [_pc("How do I reseat an ONT?", LONG),
               _pc("How do I reseat an ONT?", LONG),                                   # exact
               _pc("how do I reseat an  ONT?", LONG.replace("four", "three")),          # near
               _pc("Who handles T2 tickets?", "T2 tickets go to the field team for a walk-out.")]
    kept = [r for i, r in enumerate(records) if filters.admit(r, i)]
    assert kept == [records[0], records[3]]
    assert filters.dropped == {"exact_duplicate": 1, "near_duplicate": 1}


def test_diversity_filter_drops_a_record_too_similar_by_rouge_l() -> None:
    filters = RecordFilters(FILTERS | {"near_duplicate": None, "diversity_rouge_l": 0.7}, None, [])
    first = _pc("Explain the quiet window", LONG)
    similar = _pc("Describe the quiet window", LONG.replace("walks out", "drives").replace("reseats", "resets"))
    other = _pc("What is PARKED?", "PARKED means the ticket waits on the customer.")
    assert [filters.admit(r, i) for i, r in enumerate((first, similar, other))] == [True, False, True]
    assert filters.dropped == {"diversity": 1}


def test_planted_eval_items_are_removed_by_13_gram_decontamination() -> None:
    eval_items = [LONG, "What is a red-drop?"]
    filters = RecordFilters(FILTERS | {"near_duplicate": None}, None, eval_items)
    # Shares a 13-word run with the long eval item, inside other words.
    leaked = _pc("Tell me about walk-outs", "Sure. " + " ".join(LONG.split()[3:18]) + " and then reports back.")
    # Contains the whole short item.
    short_leak = _pc("Quiz: what is a red-drop?", "A customer under -27 dBm.")
    # Twelve words of the long item only: not contamination.
    twelve = _pc("Field work", " ".join(LONG.split()[:12]) + " on Tuesdays.")
    assert [filters.admit(r, i) for i, r in enumerate((leaked, short_leak, twelve))] == [False, False, True]
    assert filters.dropped == {"decontamination": 2}


def test_traces_that_break_the_tools_schema_are_dropped() -> None:
    tools = {t["name"]: t for t in TOOLS}
    assert check_trace(_trace("lookup_ticket", {"ticket_id": "T42"}), tools) is None
    broken = {
        "unknown tool": _trace("delete_ticket", {"ticket_id": "T42"}),
        "bad arguments": _trace("lookup_ticket", {"ticket_id": "42"}),
        "extra argument": _trace("lookup_ticket", {"ticket_id": "T42", "force": True}),
        "unanswered call": _trace("lookup_ticket", {"ticket_id": "T42"}, answered=False),
        "bad shape": {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    }
    for why, trace in broken.items():
        assert check_trace(trace, tools), why
    filters = RecordFilters(FILTERS, TOOLS, [])
    assert filters.admit(_trace("lookup_ticket", {"ticket_id": "T42"}), 0)
    assert not any(filters.admit(t, i) for i, t in enumerate(broken.values(), 1))
    assert filters.dropped == {"schema": 5}


def test_empty_answers_fail_the_format_check() -> None:
    filters = RecordFilters(FILTERS, None, [])
    assert not filters.admit(_pc("A question?", "   "), 0)
    assert not filters.admit({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                              "metadata": {}}, 1)
    assert filters.dropped == {"format": 2}


def test_corruptions_change_the_answer_in_the_recorded_way() -> None:
    text = "First check the light level. Then reseat the ONT. Finally close the ticket."
    rng = random.Random(0)
    assert corrupt(text, "truncate", rng) == ("First check the light level. Then", "truncate")
    shuffled, how = corrupt(text, "shuffle_sentences", rng)
    assert how == "shuffle_sentences" and shuffled != text and sorted(shuffled.split()) == sorted(text.split())
    dropped, how = corrupt(text, "drop_sentence", rng)
    assert how == "drop_sentence" and len(dropped.split(". ")) == 2
    # One sentence cannot be shuffled: it is truncated, and the record says so.
    assert corrupt("Reseat the ONT and wait.", "shuffle_sentences", rng) == ("Reseat the", "truncate")


def _shingles(text: str) -> set[str]:
    """Word 3-grams, lower-cased, as the filter defines them (the whole text when shorter)."""
    tokens = re.findall(r"\w+", text.lower())
    return {" ".join(tokens[i:i + 3]) for i in range(max(1, len(tokens) - 2))}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def _near_duplicates(rng: random.Random, families: int, variants: int) -> list[dict[str, Any]]:
    """Families of records: a random text and copies of it with a few words changed, added or removed,
    so that pairs fall on both sides of any threshold."""
    vocabulary = [f"word{i}" for i in range(400)]
    records = []
    for _ in range(families):
        base = [rng.choice(vocabulary) for _ in range(rng.randint(12, 80))]
        for _ in range(variants):
            text = list(base)
            for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 8])):
                at = rng.randrange(len(text))
                edit = rng.choice(["change", "add", "remove"])
                if edit == "change":
                    text[at] = rng.choice(vocabulary)
                elif edit == "add":
                    text.insert(at, rng.choice(vocabulary))
                elif len(text) > 4:
                    del text[at]
            records.append(_pc(f"Question {rng.randrange(10**6)}?", " ".join(text)))
    rng.shuffle(records)
    return records


def test_no_two_kept_records_reach_the_near_duplicate_threshold_and_none_is_dropped_below_it() -> None:
    for seed in range(12):
        rng = random.Random(seed)
        threshold = rng.choice([0.5, 0.7, 0.8, 0.9])
        filters = RecordFilters(FILTERS | {"near_duplicate": threshold}, None, [])
        kept: list[set[str]] = []
        for index, record in enumerate(_near_duplicates(rng, families=12, variants=8)):
            shingles = _shingles(record_text(record))
            closest = max((_jaccard(shingles, other) for other in kept), default=0.0)
            why = filters.why_dropped(record)
            assert filters.admit(record, index) == (why is None)
            # The exact rule, both ways: dropped if and only if some kept record is that similar.
            assert (why == "near_duplicate") == (closest >= threshold), (seed, threshold, closest, why)
            if why is None:
                kept.append(shingles)
        assert filters.dropped["near_duplicate"] > 0 and len(kept) > 12, seed
