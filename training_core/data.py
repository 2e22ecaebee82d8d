"""Dataset validation and loading for supervised fine-tuning.

The service runs `validate_file` on every dataset it registers (in-process, so this module
imports neither torch nor, until a Parquet file is read, pyarrow); the trainer calls
`load_examples`, which validates the same way and refuses an invalid file with `DatasetError`.

Record formats (one per file; see `data_files.py` for the file types):

- `text`:              {"text": str}
- `prompt_completion`: {"prompt": str, "completion": str}
- `messages`:          {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
                       An assistant turn may call tools (`"tool_calls": [{"type": "function", "function":
                       {"name": str, "arguments": str}}]`, its content then may be empty); a tool turn
                       may name its call (`"name"`, `"tool_call_id"`): workflow traces.
- `preference`:        {"prompt": str, "chosen": str, "rejected": str} (DPO), or conversational: the
                       prompt a list of turns, chosen and rejected lists of assistant turns. The
                       `{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`
                       records that hosted fine-tuning APIs take are imported as conversational ones.
- `prompt_only`:       {"prompt": str or a list of turns, "reference"?: str} (GRPO; graders may
                       compare a completion with the reference)

Each record may carry a `metadata` object, which is kept in reports and dropped for training;
any other field is a problem. Every problem is reported in one pass, each with its line, the field
(`messages[2].content` for a part of a turn) and what to change.

Decisions:

- A conversation whose last turn is not the assistant's is a *warning*, not an error: the record
  still trains on its assistant turns and only the trailing turns teach nothing (a conversation
  cut after a user turn is common in exported chat logs). A conversation with no assistant turn
  at all is an error: there is nothing to train on.
- The first record that has a format sets the file's format; a record of another format is an
  error at its line, and is still checked against its own format.
- A record's size is its length in UTF-8 bytes as compact JSON, whatever the file type, so the
  cap means the same for a JSONL line, a CSV row and a Parquet row.
- In CSV and Parquet the columns are the fields: they are checked once, at the header (CSV line
  1; Parquet has no line), not again on every row.
- Statistics describe the records of the file's format that have no errors. Token counts are of
  `record_text` (the record's text joined by newlines), without any chat template.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training_core.data_files import (
    FILE_TYPES,
    Problem,
    detect_file_type,
    json_type,
    read_columns,
    read_records,
)

__all__ = [
    "FILE_TYPES", "FORMATS", "ROLES", "DatasetError", "DatasetReport", "Problem", "detect_file_type",
    "load_examples", "read_records", "record_text", "validate_file",
]

FORMATS = ("text", "prompt_completion", "messages", "preference", "prompt_only")
FORMAT_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                 "preference": ("prompt", "chosen", "rejected"), "prompt_only": ("prompt",)}
OPTIONAL_FIELDS = ("metadata",)
FORMAT_OPTIONAL_FIELDS = {"prompt_only": ("reference",)}
HOSTED_PREFERENCE_FIELDS = ("input", "preferred_output", "non_preferred_output")
ROLES = ("system", "user", "assistant", "tool")
TURN_FIELDS = ("role", "content")
TOOL_TURN_FIELDS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}
"""Fields a turn of that role may add to role and content (workflow traces)."""
_NEEDS = ('"text", or "prompt" and "completion", or "messages", or "prompt", "chosen" and "rejected", '
          'or "prompt" alone')


@dataclass
class DatasetReport:
    """What `validate_file` found: ok when no problem (error) was found; warnings do not count."""

    ok: bool
    file_type: str
    """One of FILE_TYPES, or "unknown" when the suffix is not supported."""
    format: str | None
    """The file's format (one of FORMATS), set by its first record that has one."""
    records: int
    """Records read (lines or rows that decoded to an object), with or without problems."""
    problems: list[Problem]
    """Errors, in file order, at most `max_problems` of them."""
    problems_total: int
    stats: dict[str, Any]
    warnings: list[Problem] = field(default_factory=list)
    """Things that train but probably not as meant, at most `max_problems` of them."""
    warnings_total: int = 0


class DatasetError(ValueError):
    """An invalid dataset; `report` holds every problem, the message lists the first ones."""

    shown = 10

    def __init__(self, report: DatasetReport, path: Path | None = None) -> None:
        self.report = report
        name = f"{path.name}: " if path is not None else ""
        lines = [f"{name}dataset is invalid ({report.problems_total} problems); fix these and validate again:"]
        lines += [f"  {problem}" for problem in report.problems[: self.shown]]
        if report.problems_total > self.shown:
            lines.append(f"  ... and {report.problems_total - self.shown} more")
        super().__init__("\n".join(lines))


def validate_file(path: Path, *, max_record_bytes: int = 1_000_000, count_tokens: Callable[[str], int] | None = None,
                  max_problems: int = 100) -> DatasetReport:
    """Check every record of the file and report every problem, with statistics of the good records."""
    return _scan(path, max_record_bytes, count_tokens, max_problems, keep=False)[0]


def load_examples(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(format, records as the TRL trainers take them, metadata dropped); DatasetError if invalid."""
    report, examples = _scan(path, 1_000_000, None, 100, keep=True)
    if not report.ok or report.format is None:
        raise DatasetError(report, path)
    return report.format, examples


def record_text(record: dict[str, Any]) -> str:
    """All the text of a valid record, joined by newlines: what token counts and statistics measure."""
    if "messages" in record:
        return _turns_text(record["messages"])
    if "text" in record:
        return record["text"]
    parts = [record.get(name) for name in ("prompt", "completion", "chosen", "rejected", "reference")]
    return "\n".join(_turns_text(part) for part in parts if part is not None)


def _turns_text(value: str | list[dict[str, Any]]) -> str:
    """A conversation's text: its turns' contents, and the calls of turns that call tools."""
    if isinstance(value, str):
        return value
    return "\n".join([turn["content"] for turn in value if turn["content"]]
                     + [json.dumps(call["function"]) for turn in value for call in turn.get("tool_calls", ())])


def import_hosted_preference(record: dict[str, Any]) -> dict[str, Any]:
    """A hosted-API preference record (`input`, `preferred_output`, `non_preferred_output`) as a
    conversational `preference` record; anything malformed is passed on for the checks to name."""
    source = record.get("input")
    prompt = source.get("messages", source) if isinstance(source, dict) else source
    imported = {"prompt": prompt, "chosen": record.get("preferred_output"),
                "rejected": record.get("non_preferred_output")}
    return imported | ({"metadata": record["metadata"]} if "metadata" in record else {})


class _Capped:
    """Problems up to a cap, and the true count past it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: list[Problem] = []
        self.total = 0

    def extend(self, problems: Sequence[Problem]) -> None:
        self.items.extend(problems[: max(0, self.cap - len(self.items))])
        self.total += len(problems)


def _scan(path: Path, max_record_bytes: int, count_tokens: Callable[[str], int] | None, max_problems: int,
          keep: bool) -> tuple[DatasetReport, list[dict[str, Any]]]:
    errors, warnings = _Capped(max_problems), _Capped(max_problems)
    try:
        file_type = detect_file_type(path)
    except ValueError as err:
        errors.extend([Problem(None, None, str(err))])
        return _report("unknown", None, 0, errors, warnings, {}), []

    # Tabular files declare their fields once; check them there instead of on every row.
    columns = read_columns(path, file_type)
    column_format: str | None = None
    if columns is not None:
        column_format, problems = _check_fields(columns[1], columns[0], "column")
        errors.extend(problems)

    file_format, format_line = None, 0
    prompt_kind, prompt_kind_line = None, 0
    records, by_format = 0, Counter[str]()
    stats = _Stats(count_tokens)
    examples: list[dict[str, Any]] = []
    for line, item in read_records(path, file_type):
        if isinstance(item, Problem):
            errors.extend([item])
            continue
        records += 1
        if columns is None and all(name in item for name in HOSTED_PREFERENCE_FIELDS):
            item = import_hosted_preference(item)
        problems = []
        size = len(json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8"))
        if size > max_record_bytes:
            problems.append(Problem(line, None, (
                f"record is {size:,} bytes, over the {max_record_bytes:,}-byte cap; split it into smaller "
                "records (or raise the cap)")))
        if columns is None:
            record_format, field_problems = _check_fields(list(item), line, "field", file_format)
            problems += field_problems
        else:
            record_format = column_format
        if record_format is not None:
            by_format[record_format] += 1
            if file_format is None:
                file_format, format_line = record_format, line
            elif record_format != file_format:
                problems.append(Problem(line, None, (
                    f"record is {record_format} but the file is {file_format} (set by line {format_line}); "
                    f"one file holds one format: convert this record to {file_format} or move it to another file")))
            problems += _check_values(item, record_format, line, warnings)
            if record_format in ("preference", "prompt_only") and "prompt" in item:
                # The trainers take a file's prompts all as text or all as conversations, never mixed.
                kind = "conversational" if isinstance(item["prompt"], list) else "standard"
                if prompt_kind is None:
                    prompt_kind, prompt_kind_line = kind, line
                elif kind != prompt_kind:
                    problems.append(Problem(line, "prompt", (
                        f"record is {kind} but the file's records are {prompt_kind} (set by line {prompt_kind_line}); "
                        "a file holds prompts all as text or all as lists of turns: convert this record")))
            if "metadata" in item and not isinstance(item["metadata"], dict):
                problems.append(Problem(line, "metadata", (
                    f'"metadata" must be a JSON object, got {_a(item["metadata"])}; wrap it, e.g. '
                    '{"source": ...}, or drop it')))
        errors.extend(problems)
        # A CSV or Parquet row is not checked for a column its header lacks: leave it out here.
        if (not problems and record_format is not None and record_format == file_format
                and all(name in item for name in FORMAT_FIELDS[record_format])):
            stats.add(item, record_format, line)
            if keep:
                examples.append(_example(item, record_format))

    if records == 0:
        errors.extend([Problem(None, None, (
            "the file holds no records (it is empty or only blank lines); add at least one record, "
            'e.g. {"text": "..."}' if errors.total == 0 else "no record could be read; fix the problems above"))])
    summary = stats.summary(file_format) | {"bytes": path.stat().st_size, "records_by_format": dict(by_format)}
    return _report(file_type, file_format, records, errors, warnings, summary), examples


def _example(record: dict[str, Any], record_format: str) -> dict[str, Any]:
    """The record as the trainer takes it: only its format's fields (metadata and extra columns dropped)."""
    if record_format == "messages":
        return {"messages": _turns(record["messages"])}
    fields = FORMAT_FIELDS[record_format] + FORMAT_OPTIONAL_FIELDS.get(record_format, ())
    return {name: _turns(record[name]) if isinstance(record[name], list) else record[name]
            for name in fields if name in record}


def _turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{name: turn[name] for name in TURN_FIELDS + TOOL_TURN_FIELDS.get(turn["role"], ()) if name in turn}
            for turn in turns]


def _report(file_type: str, file_format: str | None, records: int, errors: _Capped, warnings: _Capped,
            stats: dict[str, Any]) -> DatasetReport:
    return DatasetReport(ok=errors.total == 0, file_type=file_type, format=file_format, records=records,
                         problems=errors.items, problems_total=errors.total, stats=stats,
                         warnings=warnings.items, warnings_total=warnings.total)


def _infer_format(names: Sequence[str]) -> str | None:
    """The format a set of field names is meant as: the richest one any of its fields belongs to."""
    if "messages" in names:
        return "messages"
    if "chosen" in names or "rejected" in names:
        return "preference"
    if "completion" in names:
        return "prompt_completion"
    if "prompt" in names:
        return "prompt_only"
    if "text" in names:
        return "text"
    return None


def _check_fields(names: Sequence[str], line: int | None, noun: str,
                  file_format: str | None = None) -> tuple[str | None, list[Problem]]:
    """The format the field (or column) names make, and what is missing, unknown or repeated.
    In a prompt-completion file a lone prompt is a record missing its completion."""
    record_format = _infer_format(names)
    if record_format == "prompt_only" and file_format == "prompt_completion":
        record_format = "prompt_completion"
    if record_format is None:
        found = ", ".join(f'"{n}"' for n in names) or "none"
        return None, [Problem(line, None, (
            f"no {noun} says which format this is (found {found}); a record needs {_NEEDS}: rename the "
            f"{noun}s"))]
    required = FORMAT_FIELDS[record_format]
    optional = FORMAT_OPTIONAL_FIELDS.get(record_format, ()) + OPTIONAL_FIELDS
    accepted = ", ".join(f'"{n}"' for n in required + optional)
    needs = " and ".join(f'"{r}"' for r in required)
    problems = [Problem(line, name, (
        f'"{name}" is missing: a {record_format} record needs {needs}; '
        f"add the {noun}")) for name in required if name not in names]
    for name, count in Counter(names).items():
        if name not in required + optional:
            answer_hint = (' (a prompt_completion record names its answer "completion")'
                           if record_format == "prompt_only" else "")
            problems.append(Problem(line, name, (
                f'unknown {noun} "{name}" in a {record_format} record; accepted: {accepted}{answer_hint}. Rename '
                f'or drop it (put extra information under "metadata"{"" if noun == "field" else " as JSON"})')))
        elif count > 1:
            problems.append(Problem(line, name, f'{noun} "{name}" appears {count} times; keep one'))
    return record_format, problems


def _check_values(record: dict[str, Any], record_format: str, line: int, warnings: _Capped) -> list[Problem]:
    """What is wrong with the values of the format's fields that are present (absent ones are reported
    by `_check_fields`)."""
    if record_format == "preference":
        return _check_preference(record, line)
    if record_format == "prompt_only":
        problems = [p for p in _check_prompt(record["prompt"], line)] if "prompt" in record else []
        return problems + (_check_text(record["reference"], line, "reference") if "reference" in record else [])
    if record_format != "messages":
        return [p for name in FORMAT_FIELDS[record_format] if name in record
                for p in _check_text(record[name], line, name)]
    messages = record["messages"]
    if not isinstance(messages, list):
        return [Problem(line, "messages", (
            f'"messages" must be a list of turns, got {_a(messages)}; write it as '
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'))]
    if not messages:
        return [Problem(line, "messages", (
            '"messages" is empty; a conversation needs at least a user turn and an assistant turn'))]
    problems: list[Problem] = []
    roles: list[str | None] = []
    for index, turn in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(turn, dict):
            problems.append(Problem(line, where, (
                f'turn must be an object with "role" and "content", got {_a(turn)}; '
                'e.g. {"role": "user", "content": "..."}')))
            roles.append(None)
            continue
        problems += _check_turn(turn, line, where)
        roles.append(turn.get("role"))
    if "assistant" not in roles:
        problems.append(Problem(line, "messages", (
            "conversation has no assistant turn, so there is nothing to train on; add the assistant's reply "
            '({"role": "assistant", "content": "..."}) or drop the record')))
    elif roles[-1] != "assistant":
        warnings.extend([Problem(line, f"messages[{len(roles) - 1}]", (
            f"last turn is {roles[-1] or 'not an object'}, not assistant: turns after the last assistant reply "
            "teach nothing; end the conversation with an assistant turn or drop the trailing turns "
            "(a warning: the record is still used)"))])
    return problems


def _check_prompt(prompt: Any, line: int) -> list[Problem]:
    """A prompt is a string or a conversation (a list of turns) that a completion will follow."""
    if not isinstance(prompt, list):
        return _check_text(prompt, line, "prompt")
    if not prompt:
        return [Problem(line, "prompt", '"prompt" is an empty list of turns; add at least a user turn')]
    return _check_turn_list(prompt, line, "prompt")


def _check_turn_list(turns: list[Any], line: int, name: str) -> list[Problem]:
    problems: list[Problem] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(Problem(line, f"{name}[{index}]", (
                f'turn must be an object with "role" and "content", got {_a(turn)}')))
        else:
            problems += _check_turn(turn, line, f"{name}[{index}]")
    return problems


def _check_preference(record: dict[str, Any], line: int) -> list[Problem]:
    """Standard (all strings) or conversational (all lists of turns, the answers the assistant's)."""
    problems = _check_prompt(record["prompt"], line) if "prompt" in record else []
    conversational = isinstance(record.get("prompt"), list)
    for name in ("chosen", "rejected"):
        if name not in record:
            continue
        value = record[name]
        if not conversational:
            problems += _check_text(value, line, name)
        elif not isinstance(value, list) or not value:
            problems.append(Problem(line, name, (
                f'"{name}" must be a non-empty list of assistant turns when "prompt" is a list of turns, '
                f'got {_a(value)}; e.g. [{{"role": "assistant", "content": "..."}}]')))
        else:
            problems += _check_turn_list(value, line, name)
            problems += [Problem(line, f"{name}[{i}].role", (
                f'an answer turn must be the assistant\'s, got "{turn.get("role")}"'))
                for i, turn in enumerate(value) if isinstance(turn, dict) and turn.get("role") not in
                (None, "assistant")]
    return problems


def _check_turn(turn: dict[str, Any], line: int, where: str) -> list[Problem]:
    problems = [Problem(line, f"{where}.{name}", f'"{name}" is missing from the turn; add it')
                for name in TURN_FIELDS if name not in turn]
    role = turn.get("role")
    extra = TOOL_TURN_FIELDS.get(role, ()) if isinstance(role, str) else ()
    problems += [Problem(line, f"{where}.{name}", (
        f'unknown field "{name}" in a turn; a turn takes only "role" and "content" (an assistant turn also '
        '"tool_calls", a tool turn "name" and "tool_call_id"): drop it'))
        for name in turn if name not in TURN_FIELDS + extra]
    if "role" in turn and role not in ROLES:
        allowed = ", ".join(f'"{r}"' for r in ROLES)
        shown = f'"{role}"' if isinstance(role, str) else _a(role)
        problems.append(Problem(line, f"{where}.role", f"unknown role {shown}; use one of {allowed}"))
    calls = turn.get("tool_calls") if role == "assistant" else None
    if calls is not None:
        problems += _check_tool_calls(calls, line, f"{where}.tool_calls")
    for name in ("name", "tool_call_id"):
        if role == "tool" and name in turn and not (isinstance(turn[name], str) and turn[name]):
            problems.append(Problem(line, f"{where}.{name}", f'"{name}" must be a non-empty string'))
    # A turn that only calls tools may say nothing.
    if "content" in turn and not (calls and isinstance(turn["content"], str)):
        problems += _check_text(turn["content"], line, f"{where}.content")
    return problems


def _check_tool_calls(calls: Any, line: int, where: str) -> list[Problem]:
    shape = '[{"type": "function", "function": {"name": "...", "arguments": "{...}"}}]'
    if not isinstance(calls, list) or not calls:
        return [Problem(line, where, f'"tool_calls" must be a non-empty list, e.g. {shape}')]
    problems = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not function.get("name")
                or not isinstance(function.get("arguments"), str)):
            problems.append(Problem(line, f"{where}[{index}]", (
                f"a tool call is {shape}: a function with a name and its arguments as a JSON string")))
    return problems


def _check_text(value: Any, line: int, name: str) -> list[Problem]:
    if not isinstance(value, str):
        hint = "; multimodal content parts are not supported, join their text" if isinstance(value, list) else ""
        return [Problem(line, name, f'"{name}" must be a string, got {_a(value)}; write it as text{hint}')]
    if not value.strip():
        return [Problem(line, name, f'"{name}" is empty; fill it in or drop the record')]
    return []


def _a(value: Any) -> str:
    """A value's JSON type for a message: "a number (3)", "null", "an array"."""
    kind = json_type(value)
    if kind == "null":
        return "null"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind} ({json.dumps(value)})" if kind in ("number", "boolean") else f"{article} {kind}"


def estimated_tokens(text: str) -> int:
    """A report's token count without a tokenizer: ~4 characters a token, the usual rule of thumb for
    English with BPE tokenizers (admission counts the located records with the model's own)."""
    return math.ceil(len(text) / 4)


LONGEST_KEPT = 8
"""How many of a file's longest records (by characters) its report locates, and how many it samples
at random: `records_at` reads them back, so admission can count them with the model's tokenizer."""


def records_at(path: Path, lines: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The records at lines a report located (its stats' `longest_lines`, `sample_lines`), by line,
    read again from the snapshot in one pass."""
    wanted = set(lines)
    found: dict[int, dict[str, Any]] = {}
    if not wanted:
        return found
    file_type = detect_file_type(path)
    columns = read_columns(path, file_type)
    for line, item in _records_at(path, file_type, wanted):
        hosted = columns is None and all(name in item for name in HOSTED_PREFERENCE_FIELDS)
        found[line] = import_hosted_preference(item) if hosted else item
    return found


def _records_at(path: Path, file_type: str, lines: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records on these lines, which validation read before; the rest of a JSON Lines file is
    skipped unparsed (admission reads this, and a snapshot may be gigabytes)."""
    left = set(lines)
    if file_type == "jsonl":
        with path.open("rb") as handle:
            for line, raw in enumerate(handle, start=1):  # numbered as `read_records` numbers them
                if line in left:
                    left.discard(line)
                    yield line, json.loads(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
                    if not left:
                        return
        return
    for line, item in read_records(path, file_type):
        if line in left and not isinstance(item, Problem):
            left.discard(line)
            yield line, item
            if not left:
                return


class _Stats:
    """Length statistics of the good records: characters, tokens and per-format counts."""

    def __init__(self, count_tokens: Callable[[str], int] | None) -> None:
        self.count_tokens = count_tokens
        self.chars: list[int] = []
        self.tokens: list[int] = []
        self.turns: list[int] = []
        self.roles = Counter[str]()
        self.prompt_chars: list[int] = []
        self.completion_chars: list[int] = []
        self.longest: list[tuple[int, int]] = []  # (chars, -line): a min-heap of the longest records
        self.sample: list[int] = []  # lines of a uniform sample of the records (reservoir sampling)
        self._sampling = random.Random(0)  # the same file gives the same sample

    def add(self, record: dict[str, Any], record_format: str, line: int) -> None:
        text = record_text(record)
        self.chars.append(len(text))
        heapq.heappush(self.longest, (len(text), -line))
        if len(self.longest) > LONGEST_KEPT:
            heapq.heappop(self.longest)
        if len(self.sample) < LONGEST_KEPT:
            self.sample.append(line)
        elif (slot := self._sampling.randrange(len(self.chars))) < LONGEST_KEPT:
            self.sample[slot] = line
        self.tokens.append(self.count_tokens(text) if self.count_tokens else estimated_tokens(text))
        if record_format == "messages":
            self.turns.append(len(record["messages"]))
            self.roles.update(turn["role"] for turn in record["messages"])
        elif record_format == "prompt_completion":
            self.prompt_chars.append(len(record["prompt"]))
            self.completion_chars.append(len(record["completion"]))

    def summary(self, file_format: str | None) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "chars": _spread(self.chars), "tokens": _spread(self.tokens, p95=True) | {"total": sum(self.tokens)},
            "tokens_estimated": self.count_tokens is None,
            # Where the longest records and a sample are, so admission can count them with the model's
            # own tokenizer: the longest set the sequence length, the sample scales the total.
            "longest_lines": sorted(-line for _, line in self.longest), "sample_lines": sorted(self.sample)}
        if file_format == "messages":
            stats |= {"turns": _spread(self.turns), "roles": dict(self.roles)}
        elif file_format == "prompt_completion":
            stats |= {"prompt_chars": _spread(self.prompt_chars), "completion_chars": _spread(self.completion_chars)}
        return stats


def _spread(values: list[int], p95: bool = False) -> dict[str, Any]:
    """min, mean (1 decimal), max, and the 95th percentile by nearest rank; None for each when empty."""
    if not values:
        return {"min": None, "mean": None, "max": None} | ({"p95": None} if p95 else {})
    spread: dict[str, Any] = {"min": min(values), "mean": round(sum(values) / len(values), 1), "max": max(values)}
    if p95:
        spread["p95"] = sorted(values)[math.ceil(0.95 * len(values)) - 1]
    return spread
