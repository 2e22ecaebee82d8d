"""What a generated record must pass to be kept, in order; the first check it fails drops it.

1. `format`: the fields of its format are there and are non-empty strings (tasks build records,
   but a model's output can leave a question or an answer empty).
2. `length`: its text is within `min_chars`..`max_chars`.
3. `schema`: a workflow trace is a well-formed conversation whose every tool call names one of the
   company's tools with arguments valid against that tool's JSON schema, and is answered by a
   `tool` message (`check_trace`).
4. `exact_duplicate`: the same text (case and spacing aside) as a kept record.
5. `near_duplicate`: a Jaccard similarity of word 3-gram shingles at or above `near_duplicate`
   against a kept record: computed exactly, against every kept record that could reach it (see
   `NearDuplicates`), so no two kept records are that similar and no record is dropped below it.
6. `diversity`: ROUGE-L F1 above `diversity_rouge_l` against any kept record (as self-instruct
   does; each check costs one comparison per kept record, so very large sets are slow here).
7. `decontamination`: shares a 13-word sequence with an eval item or a decontamination dataset;
   an item shorter than 13 words drops a record that contains it whole.

Scores (a judge model or a sandboxed function, `score` in the options) are applied by the job on
whole batches after these checks, since they are the expensive ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from typing import Any

import jsonschema

from training_core.graders import rouge_l

FILTERS = ("format", "length", "schema", "exact_duplicate", "near_duplicate", "diversity", "decontamination",
           "score")
_WORD = re.compile(r"\w+")


def record_text(record: dict[str, Any]) -> str:
    """All of a record's text in any of the synth formats, tool calls included."""
    if "messages" in record:
        parts = []
        for turn in record["messages"]:
            parts.append(str(turn.get("content") or ""))
            parts += [json.dumps(call.get("function"), sort_keys=True) for call in turn.get("tool_calls") or []]
        return "\n".join(p for p in parts if p)
    return "\n".join(str(record[k]) for k in ("prompt", "completion", "chosen", "rejected") if k in record)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class RecordFilters:
    def __init__(self, options: dict[str, Any], tools: list[dict[str, Any]] | None,
                 contamination: list[str], ngram: int = 13) -> None:
        self.min_chars, self.max_chars = options["min_chars"], options["max_chars"]
        self.near_threshold = options.get("near_duplicate")
        self.rouge_threshold = options.get("diversity_rouge_l")
        self.tools = {tool["name"]: tool for tool in tools} if tools is not None else None
        self.ngram = ngram
        self.dropped = Counter[str]()
        self._seen: set[str] = set()
        self._kept_words: list[list[str]] = []
        self._near = NearDuplicates(self.near_threshold) if self.near_threshold else None
        self._grams: set[tuple[str, ...]] = set()
        self._short_items: list[str] = []
        for text in contamination:
            tokens = words(text)
            if len(tokens) >= ngram:
                self._grams.update(_ngrams(tokens, ngram))
            elif tokens:
                self._short_items.append(" ".join(tokens))

    def admit(self, record: dict[str, Any], index: int) -> bool:
        """Keep the record (and remember it for the duplicate checks) or count why it was dropped."""
        reason, tokens = self._check(record)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        self._seen.add(_fingerprint(record_text(record)))
        if self._near is not None:
            self._near.add(shingles(tokens))
        if self.rouge_threshold is not None:
            self._kept_words.append(tokens)
        return True

    def why_dropped(self, record: dict[str, Any]) -> str | None:
        return self._check(record)[0]

    def _check(self, record: dict[str, Any]) -> tuple[str | None, list[str]]:
        """(the filter that drops the record or None, its words)."""
        if not _has_its_fields(record):
            return "format", []
        text = record_text(record)
        if not self.min_chars <= len(text) <= self.max_chars:
            return "length", []
        if self.tools is not None and check_trace(record, self.tools):
            return "schema", []
        if _fingerprint(text) in self._seen:
            return "exact_duplicate", []
        tokens = words(text)
        if self._near is not None and self._near.has_one_like(shingles(tokens)):
            return "near_duplicate", tokens
        if self.rouge_threshold is not None and any(
                _rouge_words(tokens, kept) > self.rouge_threshold for kept in self._kept_words):
            return "diversity", tokens
        if self._contaminated(tokens):
            return "decontamination", tokens
        return None, tokens

    def _contaminated(self, tokens: list[str]) -> bool:
        if self._grams and not self._grams.isdisjoint(_ngrams(tokens, self.ngram)):
            return True
        if self._short_items:
            joined = f" {' '.join(tokens)} "
            return any(f" {item} " in joined for item in self._short_items)
        return False


def shingles(tokens: list[str]) -> frozenset[str]:
    """Word 3-grams (the whole text when it has fewer than three words)."""
    return frozenset(" ".join(tokens[i:i + 3]) for i in range(max(1, len(tokens) - 2)))


class NearDuplicates:
    """The kept records' shingle sets, and whether a new one has a Jaccard similarity of at least
    `threshold` with any of them, computed exactly.

    A MinHash LSH index (used here before) finds candidates by chance: with 64 permutations at a
    threshold of 0.8, datasketch's 5 bands of 11 rows miss a pair at 0.886 one time in five and one
    at 0.8 two times in three, and its unverified candidates dropped records far below the
    threshold. This index is complete instead, by the prefix filter (Bayardo et al., "Scaling up
    all pairs similarity search", WWW 2007): with every set's shingles in one order, two sets x and
    y with J(x, y) >= t share at least ceil(t * max(|x|, |y|)) shingles, hence one among the first
    |x| - ceil(t * |x|) + 1 of x and the first |y| - ceil(t * |y|) + 1 of y. Each kept set is
    indexed by that prefix; a new set is compared, exactly, with the kept sets its own prefix meets
    whose size could reach the threshold (t * |x| <= |y| <= |x| / t).

    Any order is correct as long as every set is indexed and probed in the same one; rare shingles
    first makes prefixes selective (a template's shared words, in every record, would otherwise put
    every kept record in front of every new one). So the order is by how often each shingle occurs
    among the kept sets, and the index is rebuilt in the new order each time the kept sets double.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._kept: list[frozenset[str]] = []
        self._by_shingle: defaultdict[str, list[int]] = defaultdict(list)
        self._frequency: Counter[str] = Counter()
        self._rebuild_at = 16

    def has_one_like(self, candidate: frozenset[str]) -> bool:
        size, seen = len(candidate), set()
        for shingle in self._prefix(candidate):
            for number in self._by_shingle.get(shingle, ()):
                if number in seen:
                    continue
                seen.add(number)
                other = self._kept[number]
                # The size ratio bounds the Jaccard from above: most candidates end here cheaply.
                if (min(size, len(other)) / max(size, len(other)) >= self.threshold
                        and len(candidate & other) / len(candidate | other) >= self.threshold):
                    return True
        return False

    def add(self, kept: frozenset[str]) -> None:
        self._kept.append(kept)
        if len(self._kept) >= self._rebuild_at:
            self._rebuild_at *= 2
            self._frequency = Counter(shingle for each in self._kept for shingle in each)
            self._by_shingle.clear()
            for number, each in enumerate(self._kept):
                self._index(number, each)
        else:
            self._index(len(self._kept) - 1, kept)

    def _index(self, number: int, kept: frozenset[str]) -> None:
        for shingle in self._prefix(kept):
            self._by_shingle[shingle].append(number)

    def _prefix(self, items: frozenset[str]) -> list[str]:
        # ceil(t * n), less a hair, so that float error never shortens the prefix below the bound.
        length = len(items) - math.ceil(self.threshold * len(items) - 1e-9) + 1
        frequency = self._frequency
        return sorted(items, key=lambda shingle: (frequency[shingle], hash(shingle), shingle))[:length]


# ---- workflow traces -----------------------------------------------------------------------------

TRACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {"messages": {"type": "array", "minItems": 2, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "user", "assistant", "tool"]},
            "content": {"type": "string"},
            "tool_call_id": {"type": "string"},
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "function"],
                "properties": {"id": {"type": "string"}, "type": {"const": "function"}, "function": {
                    "type": "object", "required": ["name", "arguments"],
                    "properties": {"name": {"type": "string"}, "arguments": {"type": ["string", "object"]}},
                    "additionalProperties": False}},
                "additionalProperties": False}}},
        "additionalProperties": False}}},
}
"""A trace's shape (the chat `messages` format with OpenAI-style tool calls), checked first."""


def check_trace(record: dict[str, Any], tools: dict[str, dict[str, Any]]) -> str | None:
    """Why the trace breaks the schema of the company's tools, or None when it follows it."""
    shape = next(jsonschema.Draft202012Validator(TRACE_SCHEMA).iter_errors(record), None)
    if shape is not None:
        return f"{'/'.join(str(p) for p in shape.absolute_path) or 'record'}: {shape.message}"
    messages = record["messages"]
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return "the trace must end with the assistant's answer"
    pending: list[str] = []
    for index, turn in enumerate(messages):
        if turn["role"] == "tool":
            if not pending:
                return f"messages[{index}]: a tool result with no tool call before it"
            expected = pending.pop(0)
            if turn.get("name", expected) != expected:
                return f"messages[{index}]: result of {turn['name']!r} where {expected!r} was called"
            continue
        if pending:
            return f"messages[{index}]: tool call {pending[0]!r} has no result"
        for call in turn.get("tool_calls") or []:
            if turn["role"] != "assistant":
                return f"messages[{index}]: only the assistant calls tools"
            problem = _check_call(call["function"], tools)
            if problem:
                return f"messages[{index}]: {problem}"
            pending.append(call["function"]["name"])
    return None


def _check_call(function: dict[str, Any], tools: dict[str, dict[str, Any]]) -> str | None:
    name, arguments = function["name"], function["arguments"]
    if name not in tools:
        return f"calls {name!r}, which is not one of the tools ({', '.join(sorted(tools))})"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"arguments of {name!r} are not JSON"
    error = next(jsonschema.Draft202012Validator(tools[name].get("parameters") or {}).iter_errors(arguments), None)
    if error is not None:
        return f"arguments of {name!r} break its schema: {error.message}"
    return None


# ---- helpers -------------------------------------------------------------------------------------

_FORMAT_FIELDS = (("messages",), ("prompt", "chosen", "rejected"), ("prompt", "completion"), ("prompt",))


def _has_its_fields(record: dict[str, Any]) -> bool:
    if "messages" in record:
        turns = record["messages"]
        return (isinstance(turns, list) and bool(turns) and all(isinstance(t, dict) for t in turns)
                and all(isinstance(t.get("content"), str) for t in turns)
                and any(t.get("role") == "assistant" and t["content"].strip() for t in turns))
    fields = next(f for f in _FORMAT_FIELDS if all(k in record for k in f)) if "prompt" in record else ()
    return bool(fields) and all(isinstance(record[k], str) and record[k].strip() for k in fields)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _rouge_words(a: list[str], b: list[str]) -> float:
    # graders.rouge_l tokenises its strings the same way (lower-cased \w+ words).
    return rouge_l(" ".join(a), " ".join(b))
