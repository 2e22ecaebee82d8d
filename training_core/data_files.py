"""Reading dataset files into records: JSON Lines, CSV, Parquet and plain text.

- JSON Lines (`.jsonl`, `.json`): one JSON object a line; blank lines are skipped.
- CSV (`.csv`): a header row, then one record a row. Cells of a `messages` or `metadata` column
  hold JSON (a list of turns, an object); an empty `metadata` cell means none.
- Parquet (`.parquet`): one record a row; `messages` may be a list of structs or a JSON string.
- Plain text (`.txt`): the whole file is one corpus, one `{"text": ...}` record per paragraph
  (paragraphs are separated by blank lines).

Reading never raises on bad content: what cannot be decoded (bytes that are not UTF-8, a line
that is not JSON or not an object, a CSV row with the wrong number of cells, a JSON cell that
does not parse) comes out as a `Problem` in the record's place, so validation reports every
problem in one pass. What a record must contain is checked in `data.py`, not here.

Line numbers are 1-based: the JSONL line, the physical line a CSV row starts on, the Parquet row
number, the first line of a text paragraph. A UTF-8 byte order mark at the start is accepted.

Only the standard library is imported up front; pyarrow is imported when a Parquet file is read,
because the service imports this module in-process and must start fast.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_TYPES = ("jsonl", "csv", "parquet", "txt")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
JSON_CELLS = ("messages", "metadata")
"""Columns whose CSV (or Parquet string) cells hold JSON rather than text."""

# A file this small is parsed whole to tell a pretty-printed JSON document from broken JSON Lines;
# a larger one is not, so a mistaken upload cannot make validation load gigabytes at once.
_WHOLE_JSON_PROBE_BYTES = 64 * 1024 * 1024
# csv's default cell cap (128 KiB) is below the record size cap; record size is checked in data.py.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class Problem:
    """One thing wrong with a dataset: where (line, field) and what to change (message)."""

    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = "file" if self.line is None else f"line {self.line}"
        if self.field is not None:
            where += f", field {self.field}"
        return f"{where}: {self.message}"


def detect_file_type(path: Path) -> str:
    """The file type (one of FILE_TYPES) from the suffix; ValueError naming the allowed ones."""
    file_type = SUFFIXES.get(path.suffix.lower())
    if file_type is None:
        allowed = ", ".join(SUFFIXES)
        raise ValueError(f"{path.name!r} has an unsupported suffix {path.suffix or '(none)'!r}; "
                         f"use one of {allowed}")
    return file_type


def read_records(path: Path, file_type: str | None = None) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    """(line, record) for each record of the file, or (line, Problem) where one cannot be read."""
    file_type = file_type or detect_file_type(path)
    readers = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "txt": _read_txt}
    return readers[file_type](path)


def read_columns(path: Path, file_type: str) -> tuple[int | None, list[str]] | None:
    """(line, names) of a CSV header or a Parquet schema; None for JSONL and text, or if unreadable.

    Tabular files declare their fields once, so validation checks them once rather than per row.
    """
    if file_type == "csv":
        for line, row, _ in _csv_rows(path):
            return line, row
        return None
    if file_type == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return None, list(pq.ParquetFile(path).schema_arrow.names)
        except pyarrow.ArrowException:
            return None  # read_records reports why
    return None


def _decode(raw: bytes, line: int, offset: int) -> tuple[str, Problem | None]:
    """The line as text, and a Problem if it is not UTF-8 (the text then has U+FFFD in its place)."""
    if offset == 0 and raw.startswith(codecs.BOM_UTF8):
        raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        problem = Problem(line, None, (
            f"bytes are not UTF-8 at byte offset {offset + err.start} of the file (column {err.start + 1} "
            f"of the line, byte 0x{raw[err.start]:02x}); re-encode the file as UTF-8, "
            "e.g. `iconv -f cp1252 -t utf-8 in > out`"))
        return raw.decode("utf-8", errors="replace"), problem


def _physical_lines(path: Path) -> Iterator[tuple[int, str, Problem | None]]:
    """(line, text, encoding problem) for each line, line ending kept; read as bytes to find bad ones."""
    offset = 0
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            text, problem = _decode(raw, line, offset)
            yield line, text, problem
            offset += len(raw)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    first = True
    for line, text, problem in _physical_lines(path):
        if problem is not None:
            yield line, problem
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text.rstrip("\r\n"))  # a raw newline would read as a bad string character
        except json.JSONDecodeError as err:
            if first and _is_one_json_document(path):
                yield line, Problem(line, None, (
                    "the file is one JSON document (a pretty-printed array or object), not JSON Lines; "
                    "write one object per line, e.g. `jq -c '.[]' data.json > data.jsonl`"))
                return
            yield line, Problem(line, None, (
                f"invalid JSON: {_where(err)}; each line must be one complete JSON object, "
                'e.g. {"text": "..."}'))
            continue
        except RecursionError:
            yield line, Problem(line, None, "JSON is nested too deeply to read; flatten the record")
            continue
        finally:
            first = False
        if isinstance(value, dict):
            yield line, value
        else:
            yield line, Problem(line, None, (
                f"line is a JSON {json_type(value)}, not an object; each line must be one object such as "
                '{"text": "..."} (a file holding one array is not JSON Lines)'))


def _is_one_json_document(path: Path) -> bool:
    if path.stat().st_size > _WHOLE_JSON_PROBE_BYTES:
        return False
    try:
        json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return True


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str], list[Problem]]]:
    """(line a row starts on, its cells, its encoding or parsing problems) for each non-blank row."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    bad: list[Problem] = []

    def lines() -> Iterator[str]:
        for _, text, problem in _physical_lines(path):
            if problem is not None:
                bad.append(problem)
            yield text

    reader = csv.reader(lines())
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            bad.append(Problem(start, None, f"CSV row cannot be parsed: {err}; check its quoting"))
            row = []
        if row or bad:  # csv yields [] for a blank line
            yield start, row, list(bad)
            bad.clear()


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    header: list[str] | None = None
    for line, row, problems in _csv_rows(path):
        for problem in problems:
            yield problem.line or line, problem
        if header is None:
            header = row  # even a header with bad bytes: its columns are then reported as unknown
        elif problems:
            continue  # a row with undecodable bytes is reported, not read
        elif len(row) != len(header):
            yield line, Problem(line, None, (
                f"row has {len(row)} cells but the header has {len(header)} columns; quote cells that "
                'contain commas or line breaks ("a, b"), and double quotes inside them ("")'))
        else:
            yield line, _with_json_cells(line, dict(zip(header, row, strict=True)))


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, _with_json_cells(row, _without_null_turn_keys(record))
    except pyarrow.ArrowException as err:
        where = "the file" if row == 0 else f"the rows after row {row}"
        yield row + 1, Problem(None if row == 0 else row + 1, None, (
            f"cannot read {where} as Parquet: {err}; write the file with pandas `DataFrame.to_parquet` "
            "or `pyarrow.parquet.write_table`"))


def _without_null_turn_keys(record: dict[str, Any]) -> dict[str, Any]:
    """Drop null keys of turns other than role and content.

    A Parquet struct column gives every turn every key of the schema, so one turn with a `name`
    gives all the others `name: None`; those are not fields the writer meant.
    """
    messages = record.get("messages")
    if isinstance(messages, list):
        record["messages"] = [
            {k: v for k, v in turn.items() if v is not None or k in ("role", "content")}
            if isinstance(turn, dict) else turn for turn in messages]
    return record


def _with_json_cells(line: int, record: dict[str, Any]) -> dict[str, Any] | Problem:
    """The record with its JSON cells parsed; an empty metadata cell means no metadata."""
    for column in JSON_CELLS:
        value = record.get(column)
        if column == "metadata" and value in ("", None):
            record.pop(column, None)
        elif isinstance(value, str):
            try:
                record[column] = json.loads(value)
            except json.JSONDecodeError as err:
                example = '[{"role": "user", "content": "..."}]' if column == "messages" else '{"source": "..."}'
                return Problem(line, column, (
                    f"the {column} cell is not valid JSON ({_where(err)}); write it as JSON, e.g. {example}"))
    return record


def _read_txt(path: Path) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    paragraph: list[str] = []
    start = 0
    broken = False  # a paragraph with undecodable bytes is reported, not read
    for line, text, problem in _physical_lines(path):
        if problem is not None:
            yield line, problem
            broken = True
        if text.strip():
            if not paragraph:
                start = line
            paragraph.append(text.rstrip("\r\n"))
            continue
        if paragraph and not broken:
            yield start, {"text": "\n".join(paragraph)}
        paragraph, broken = [], False
    if paragraph and not broken:
        yield start, {"text": "\n".join(paragraph)}


def _where(err: json.JSONDecodeError) -> str:
    """The parser's complaint and column: "Expecting ',' delimiter at column 12"."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages about the wrong one."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
