"""What a generated record must pass to be kept, in order; the first check it fails drops it.

1. `format`: the fields of its format are there and are non-empty strings (tasks build records,
   but a model's output can leave a question or an answer empty).
2. `length`: its text is within `min_chars`..`max_chars`.
3. `schema`: a workflow trace is a well-formed conversation whose every tool call names one of the
   company's tools with arguments valid against that tool's JSON schema, and is answered by a
   `tool` message (`check_trace`).
4. `exact_duplicate`: the same text (case and spacing aside) as a kept record.
5. `near_duplicate`: a MinHash (word 3-gram shingles) Jaccard estimate at or above
   `near_duplicate` against a kept record (datasketch's LSH finds the candidates).
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
import re
from collections import Counter
from typing import Any

import jsonschema
from datasketch import MinHash, MinHashLSH

from training_core.graders import rouge_l

FILTERS = ("format", "length", "schema", "exact_duplicate", "near_duplicate", "diversity", "decontamination",
           "score")
_WORD = re.compile(r"\w+")
NUM_PERM = 64


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
        self._lsh = MinHashLSH(threshold=self.near_threshold, num_perm=NUM_PERM) if self.near_threshold else None
        template = MinHash(num_perm=NUM_PERM, seed=1)
        self._permutations, self._scheme = template.permutations, template.scheme
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
        reason, tokens, minhash = self._check(record)
        if reason is not None:
            self.dropped[reason] += 1
            return False
        self._seen.add(_fingerprint(record_text(record)))
        if self._lsh is not None:
            self._lsh.insert(str(index), minhash or self._minhash(tokens))
        if self.rouge_threshold is not None:
            self._kept_words.append(tokens)
        return True

    def why_dropped(self, record: dict[str, Any]) -> str | None:
        return self._check(record)[0]

    def _check(self, record: dict[str, Any]) -> tuple[str | None, list[str], MinHash | None]:
        """(the filter that drops the record or None, its words, its MinHash once computed)."""
        if not _has_its_fields(record):
            return "format", [], None
        text = record_text(record)
        if not self.min_chars <= len(text) <= self.max_chars:
            return "length", [], None
        if self.tools is not None and check_trace(record, self.tools):
            return "schema", [], None
        if _fingerprint(text) in self._seen:
            return "exact_duplicate", [], None
        tokens = words(text)
        minhash = None
        if self._lsh is not None:
            minhash = self._minhash(tokens)
            if self._lsh.query(minhash):
                return "near_duplicate", tokens, minhash
        if self.rouge_threshold is not None and any(
                _rouge_words(tokens, kept) > self.rouge_threshold for kept in self._kept_words):
            return "diversity", tokens, minhash
        if self._contaminated(tokens):
            return "decontamination", tokens, minhash
        return None, tokens, minhash

    def _minhash(self, tokens: list[str]) -> MinHash:
        shingles = {" ".join(tokens[i:i + 3]) for i in range(max(1, len(tokens) - 2))}
        # The permutations are drawn once: building them is most of a MinHash's cost.
        minhash = MinHash(num_perm=NUM_PERM, seed=1, permutations=self._permutations, scheme=self._scheme)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def _contaminated(self, tokens: list[str]) -> bool:
        if self._grams and not self._grams.isdisjoint(_ngrams(tokens, self.ngram)):
            return True
        if self._short_items:
            joined = f" {' '.join(tokens)} "
            return any(f" {item} " in joined for item in self._short_items)
        return False


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
