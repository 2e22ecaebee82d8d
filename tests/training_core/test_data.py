"""Dataset reading and validation: every malformed file names its line, field and the fix."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training_core.data import (
    LONGEST_KEPT,
    DatasetError,
    DatasetReport,
    Problem,
    detect_file_type,
    load_examples,
    read_records,
    record_text,
    records_at,
    validate_file,
)

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
RECORDS = {
    "text": [{"text": "The cat sat."}, {"text": "The dog ran\nacross the yard."}],
    "prompt_completion": [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "3 + 3 =", "completion": " 6"}],
    "messages": [{"messages": [USER, ASSISTANT]},
                 {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]}],
}


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_dataset(tmp_path: Path, file_type: str, records: list[dict[str, Any]]) -> Path:
    if file_type == "jsonl":
        return write(tmp_path, "data.jsonl", jsonl(*records))
    if file_type == "csv":
        columns = list(records[0])
        lines = [",".join(columns)]
        for record in records:
            cells = [json.dumps(v) if isinstance(v, list | dict) else v for v in record.values()]
            lines.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
        return write(tmp_path, "data.csv", "\n".join(lines) + "\n")
    if file_type == "parquet":
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
        return tmp_path / "data.parquet"
    return write(tmp_path, "data.txt", "\n\n".join(r["text"] for r in records) + "\n")


def only_problem(report: DatasetReport) -> Problem:
    assert not report.ok
    assert report.problems_total == len(report.problems) == 1, report.problems
    return report.problems[0]


# --- malformed files: one kind each, with its exact line, field and message ---


def test_invalid_json_names_its_line_and_the_parsers_column(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "ok"}) + '{"text": "unterminated}\n')
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (2, None)
    assert problem.message.startswith("invalid JSON: Unterminated string starting at column 10; each line must")


def test_a_line_that_is_json_but_not_an_object_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "ok"}, [1, 2], "just a string"))
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, None), (3, None)]
    assert "JSON array, not an object" in report.problems[0].message
    assert "JSON string, not an object" in report.problems[1].message
    assert report.records == 1


def test_a_prompt_without_its_completion_is_missing_the_completion(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "3 + 3 ="}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (2, "completion")
    assert problem.message.startswith('"completion" is missing: a prompt_completion record needs "prompt" and')


def test_an_unknown_field_is_named_with_the_accepted_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a"}, {"text": "b", "colour": "red"}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (2, "colour")
    assert 'unknown field "colour"' in problem.message
    assert 'accepted: "text", "metadata"' in problem.message


def test_content_that_is_a_number_has_the_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, {"role": "assistant", "content": 4}]}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (1, "messages[1].content")
    assert '"messages[1].content" must be a string, got a number (4)' in problem.message


def test_an_unknown_role_is_named_with_the_allowed_roles(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [{"role": "human", "content": "hi"}, ASSISTANT]}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (1, "messages[0].role")
    assert problem.message == 'unknown role "human"; use one of "system", "user", "assistant", "tool"'


def test_empty_content_is_a_problem_at_its_turn(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, {"role": "assistant", "content": "  \n"}]}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (1, "messages[1].content")
    assert "is empty; fill it in or drop the record" in problem.message


def test_empty_text_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a"}, {"text": "a"}, {"text": ""}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (3, "text")
    assert '"text" is empty' in problem.message


def test_a_conversation_without_an_assistant_turn_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, ASSISTANT]}, {"messages": [USER]}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (2, "messages")
    assert "no assistant turn, so there is nothing to train on" in problem.message


def test_a_conversation_ending_on_a_user_turn_is_only_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, ASSISTANT, USER]}))
    report = validate_file(path)
    assert report.ok and report.problems_total == 0
    assert report.warnings_total == 1
    warning = report.warnings[0]
    assert (warning.line, warning.field) == (1, "messages[2]")
    assert "last turn is user, not assistant" in warning.message and "still used" in warning.message
    assert load_examples(path)[1] == [{"messages": [USER, ASSISTANT, USER]}]


def test_a_record_of_another_format_is_reported_naming_both_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a"}, {"text": "b"}, {"messages": [USER, ASSISTANT]}))
    report = validate_file(path)
    problem = only_problem(report)
    assert (problem.line, problem.field) == (3, None)
    assert problem.message.startswith("record is messages but the file is text (set by line 1)")
    assert report.format == "text" and report.stats["records_by_format"] == {"text": 2, "messages": 1}


def test_bytes_that_are_not_utf8_are_reported_with_line_and_byte_offset(tmp_path: Path) -> None:
    first = jsonl({"text": "ok"}).encode()
    path = write(tmp_path, "d.jsonl", first + b'{"text": "caf\xe9"}\n' + jsonl({"text": "fine"}).encode())
    report = validate_file(path)
    problem = only_problem(report)
    assert (problem.line, problem.field) == (2, None)
    assert f"not UTF-8 at byte offset {len(first) + 13} of the file (column 14" in problem.message
    assert "0xe9" in problem.message and "re-encode the file as UTF-8" in problem.message
    assert report.records == 2


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    for name, content in [("d.jsonl", jsonl({"text": "a"})), ("d.csv", "text\nhello\n"), ("d.txt", "hello\n")]:
        report = validate_file(write(tmp_path, name, bom + content.encode()))
        assert report.ok and report.records == 1, (name, report.problems)


def test_an_oversized_record_says_its_size_and_the_cap(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "short"}, {"text": "x" * 2000}))
    problem = only_problem(validate_file(path, max_record_bytes=1000))
    assert (problem.line, problem.field) == (2, None)
    assert problem.message.startswith("record is 2,011 bytes, over the 1,000-byte cap; split it")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank lines"])
def test_a_file_without_records_is_a_problem(tmp_path: Path, content: str) -> None:
    report = validate_file(write(tmp_path, "d.jsonl", content))
    problem = only_problem(report)
    assert (problem.line, problem.field) == (None, None)
    assert "holds no records" in problem.message and report.records == 0


def test_a_csv_header_missing_a_column_is_reported_once_at_line_one(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "prompt,answer\n2 + 2 =,4\n3 + 3 =,6\n")
    report = validate_file(path)
    # A lone prompt column makes a prompt-only (GRPO) file; the message points at "completion".
    assert [(p.line, p.field) for p in report.problems] == [(1, "answer")]
    assert 'unknown column "answer"' in report.problems[0].message
    assert 'names its answer "completion"' in report.problems[0].message
    assert report.records == 2


def test_messages_that_is_not_a_list_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": "hello"}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (1, "messages")
    assert '"messages" must be a list of turns, got a string' in problem.message


def test_a_turn_that_is_not_an_object_is_named_by_its_index(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, "sure", ASSISTANT]}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (1, "messages[1]")
    assert 'turn must be an object with "role" and "content", got a string' in problem.message


def test_a_turn_missing_its_role_or_with_an_extra_field_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [{"content": "hi"}, ASSISTANT | {"name": "bot"}]}))
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(1, "messages[0].role"), (1, "messages[1].name")]
    assert '"role" is missing' in report.problems[0].message
    assert 'unknown field "name" in a turn' in report.problems[1].message


def test_a_csv_row_with_the_wrong_number_of_cells_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "prompt,completion\nhello,world\n1, 2,3\n")
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (3, None)
    assert "row has 3 cells but the header has 2 columns; quote cells" in problem.message


def test_a_csv_messages_cell_that_is_not_json_is_a_problem(tmp_path: Path) -> None:
    good = json.dumps([USER, ASSISTANT]).replace('"', '""')
    path = write(tmp_path, "d.csv", f'messages\n"{good}"\n"[{{role: user}}]"\n')
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (3, "messages")
    assert "the messages cell is not valid JSON" in problem.message


def test_a_null_in_a_parquet_text_column_has_the_wrong_type(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}, {"text": None}]), tmp_path / "d.parquet")
    problem = only_problem(validate_file(tmp_path / "d.parquet"))
    assert (problem.line, problem.field) == (3, "text")
    assert '"text" must be a string, got null' in problem.message


def test_metadata_that_is_not_an_object_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a", "metadata": {"source": "wiki"}},
                                            {"text": "b", "metadata": 7}))
    problem = only_problem(validate_file(path))
    assert (problem.line, problem.field) == (2, "metadata")
    assert '"metadata" must be a JSON object, got a number (7)' in problem.message


def test_a_record_without_any_format_field_says_what_a_record_needs(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"question": "q", "answer": "a"}))
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(1, None)]
    assert 'found "question", "answer"' in report.problems[0].message
    assert 'needs "text", or "prompt" and "completion", or "messages"' in report.problems[0].message
    assert report.format is None


def test_a_pretty_printed_json_array_is_reported_once_as_not_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "d.json", json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(1, None), (None, None)]
    assert "not JSON Lines" in report.problems[0].message and "jq -c" in report.problems[0].message
    assert "no record could be read" in report.problems[1].message


def test_an_unreadable_parquet_file_is_reported_not_raised(tmp_path: Path) -> None:
    report = validate_file(write(tmp_path, "d.parquet", b"PAR1 but not really"))
    assert report.problems[0].line is None and "cannot read the file as Parquet" in report.problems[0].message
    assert report.records == 0


def test_an_unsupported_suffix_is_refused_naming_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.xlsx'; use one of \.jsonl, \.json, \.csv, \.parquet, \.txt"):
        detect_file_type(Path("sheet.xlsx"))
    report = validate_file(write(tmp_path, "sheet.xlsx", "x"))
    assert report.file_type == "unknown" and "use one of .jsonl" in only_problem(report).message


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", "\n" + jsonl({"text": "a"}) + "   \n\n" + jsonl({"text": ""}))
    report = validate_file(path)
    assert report.records == 2
    assert [(p.line, p.field) for p in report.problems] == [(5, "text")]


def test_csv_lines_count_the_physical_lines_of_multiline_cells(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'text\n"two\nlines"\n\n""\n')
    assert [line for line, _ in read_records(path)] == [2, 5]
    assert [(p.line, p.field) for p in validate_file(path).problems] == [(5, "text")]


def test_a_txt_paragraph_with_bad_bytes_is_reported_and_the_others_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "d.txt", b"first paragraph\n\nsecond\ncaf\xe9 here\n\n\nthird one\n")
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(4, None)]
    assert "not UTF-8" in report.problems[0].message
    assert [line for line, item in read_records(path) if isinstance(item, dict)] == [1, 7]


# --- whole files ---


@pytest.mark.parametrize(("file_type", "record_format"), [
    ("jsonl", "text"), ("jsonl", "prompt_completion"), ("jsonl", "messages"),
    ("csv", "text"), ("csv", "prompt_completion"), ("csv", "messages"),
    ("parquet", "text"), ("parquet", "prompt_completion"), ("parquet", "messages"),
    ("txt", "text"),
])
def test_valid_files_of_every_type_and_format_are_ok(tmp_path: Path, file_type: str, record_format: str) -> None:
    records = RECORDS[record_format]
    path = write_dataset(tmp_path, file_type, records)
    report = validate_file(path)
    assert report.ok, report.problems
    assert (report.file_type, report.format, report.records) == (file_type, record_format, 2)
    assert report.warnings_total == 0 and report.stats["records_by_format"] == {record_format: 2}
    assert load_examples(path) == (record_format, records)


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    content = (jsonl({"messages": [USER, ASSISTANT]}) + "{oops\n"
               + jsonl({"messages": [{"role": "robot", "content": ""}, ASSISTANT]}, {"text": "plain"})
               + '{"messages": [1]}\n').encode() + b"\xff\n" + jsonl({"messages": [USER], "extra": 1}).encode()
    report = validate_file(write(tmp_path, "d.jsonl", content))
    assert [(p.line, p.field) for p in report.problems] == [
        (2, None),
        (3, "messages[0].role"), (3, "messages[0].content"),
        (4, None),
        (5, "messages[0]"), (5, "messages"),
        (6, None),
        (7, "extra"), (7, "messages"),
    ]
    assert report.problems_total == 9 and report.records == 5


def test_problems_past_the_cap_are_counted_but_not_listed(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl(*[{"text": ""}] * 30))
    report = validate_file(path, max_problems=5)
    assert len(report.problems) == 5 and report.problems_total == 30
    assert [p.line for p in report.problems] == [1, 2, 3, 4, 5]
    with pytest.raises(DatasetError) as refused:
        load_examples(path)
    message = str(refused.value)
    assert message.startswith("d.jsonl: dataset is invalid (30 problems)")
    assert "line 1, field text: " in message and "... and 20 more" in message
    assert refused.value.report.problems_total == 30


def test_stats_are_right_on_a_small_known_file(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"text": "abcd"}, {"text": "abcdefghi"}, {"text": "ab"}, {"text": ""}))
    stats = validate_file(path).stats
    assert stats["chars"] == {"min": 2, "mean": 5.0, "max": 9}
    assert stats["tokens"] == {"min": 1, "mean": 1.7, "max": 3, "p95": 3, "total": 5}
    assert stats["tokens_estimated"] is True
    assert stats["bytes"] == path.stat().st_size


def test_stats_count_turns_roles_and_prompt_lengths(tmp_path: Path) -> None:
    conversations = validate_file(write_dataset(tmp_path, "jsonl", RECORDS["messages"])).stats
    assert conversations["turns"] == {"min": 2, "mean": 2.5, "max": 3}
    assert conversations["roles"] == {"user": 2, "assistant": 2, "system": 1}
    pairs = validate_file(write(tmp_path, "p.jsonl", jsonl({"prompt": "ab", "completion": "c"},
                                                           {"prompt": "abcd", "completion": "cde"}))).stats
    assert pairs["prompt_chars"] == {"min": 2, "mean": 3.0, "max": 4}
    assert pairs["completion_chars"] == {"min": 1, "mean": 2.0, "max": 3}


def test_count_tokens_is_used_when_given(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl(*[{"text": " ".join(["w"] * n)} for n in range(1, 21)]))
    seen: list[str] = []

    def words(text: str) -> int:
        seen.append(text)
        return len(text.split())

    stats = validate_file(path, count_tokens=words).stats
    assert len(seen) == 20
    assert stats["tokens"] == {"min": 1, "mean": 10.5, "max": 20, "p95": 19, "total": 210}
    assert stats["tokens_estimated"] is False


def test_load_examples_keeps_only_the_fields_the_trainer_takes(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, ASSISTANT], "metadata": {"source": "chat"}}))
    assert load_examples(path) == ("messages", [{"messages": [USER, ASSISTANT]}])
    csv_path = write(tmp_path, "d.csv", 'text,metadata\nhello,"{""id"": 1}"\nbye,\n')
    assert validate_file(csv_path).ok
    assert load_examples(csv_path) == ("text", [{"text": "hello"}, {"text": "bye"}])


def test_parquet_turns_with_null_extra_keys_are_accepted(tmp_path: Path) -> None:
    # A struct column gives every turn every key: one turn's "name" becomes name=None on the others.
    records = [{"messages": [USER, ASSISTANT]}, {"messages": [USER, ASSISTANT | {"name": "bot"}]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    report = validate_file(tmp_path / "d.parquet")
    assert [(p.line, p.field) for p in report.problems] == [(2, "messages[1].name")]


def test_read_records_yields_problems_in_place_instead_of_raising(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", b'{"text": "a"}\n\xc3\x28\n[]\n{"text": "b"}\n')
    items = list(read_records(path))
    assert [line for line, _ in items] == [1, 2, 3, 4]
    assert [type(item).__name__ for _, item in items] == ["dict", "Problem", "Problem", "dict"]


def test_record_text_joins_all_text_of_a_record() -> None:
    assert record_text({"text": "a b", "metadata": {"x": "y"}}) == "a b"
    assert record_text({"prompt": "2 + 2 =", "completion": " 4"}) == "2 + 2 =\n 4"
    assert record_text(RECORDS["messages"][1]) == "Be brief.\nWhat is 2 + 2?\n4"


def test_the_report_is_json_serialisable_for_the_store(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl({"messages": [USER, ASSISTANT, USER]}, {"text": "x"}))
    stored = json.loads(json.dumps(dataclasses.asdict(validate_file(path))))
    assert stored["problems"][0]["line"] == 2 and stored["warnings"][0]["field"] == "messages[2]"


def test_importing_the_module_loads_neither_torch_nor_pyarrow() -> None:
    code = "import sys, training_core.data; print(sorted({'torch', 'pyarrow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[2])
    assert result.stdout.strip() == "[]"


def test_preference_records_standard_conversational_and_hosted_import(tmp_path: Path) -> None:
    user, good, bad = ({"role": "user", "content": "Is it up?"}, {"role": "assistant", "content": "Yes."},
                       {"role": "assistant", "content": "No idea."})
    standard = write(tmp_path, "s.jsonl", jsonl({"prompt": "Is it up?", "chosen": "Yes.", "rejected": "No idea."}))
    assert load_examples(standard) == ("preference",
                                       [{"prompt": "Is it up?", "chosen": "Yes.", "rejected": "No idea."}])
    hosted = write(tmp_path, "h.jsonl", jsonl({"input": {"messages": [user], "tools": []},
                                               "preferred_output": [good], "non_preferred_output": [bad]}))
    assert load_examples(hosted) == ("preference", [{"prompt": [user], "chosen": [good], "rejected": [bad]}])


def test_malformed_preferences_name_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", jsonl(
        {"prompt": "q", "chosen": "a"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "user", "content": "b"}]}))
    report = validate_file(path)
    # Line 2 is also conversational in a file whose prompts line 1 made text.
    assert [(p.line, p.field) for p in report.problems] == [
        (1, "rejected"), (2, "chosen"), (2, "rejected[0].role"), (2, "prompt")]


def test_prompt_only_records_keep_their_reference(tmp_path: Path) -> None:
    path = write(tmp_path, "g.jsonl", jsonl({"prompt": "Say yes", "reference": "yes"}, {"prompt": "Say no"}))
    file_format, examples = load_examples(path)
    assert file_format == "prompt_only"
    assert examples == [{"prompt": "Say yes", "reference": "yes"}, {"prompt": "Say no"}]
    turns = write(tmp_path, "t.jsonl", jsonl({"prompt": [{"role": "user", "content": "Say no"}]}))
    assert load_examples(turns) == ("prompt_only", [{"prompt": [{"role": "user", "content": "Say no"}]}])


@pytest.mark.parametrize("file_type", ["jsonl", "csv"])
def test_a_report_locates_the_longest_records_and_they_read_back_as_validated(tmp_path: Path, file_type: str) -> None:
    # Lengths in a shuffled order, a blank line and a record too long for the cap among them: the
    # longest good records are found by their lines, not by their order.
    lengths = [7, 31, 3, 19, 40, 11, 2, 27, 35, 5, 23, 15, 38]
    records = [{"prompt": "q" * n, "completion": "a"} for n in lengths]
    if file_type == "jsonl":
        lines = [json.dumps(r) for r in records]
        lines.insert(4, "")
        lines.insert(6, json.dumps({"prompt": "q" * 500, "completion": "a"}))  # over the cap below
        path = write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")
    else:
        path = write(tmp_path, "data.csv", "prompt,completion\n" + "".join(
            f'"{r["prompt"]}",{r["completion"]}\n' for r in records))
    report = dataclasses.asdict(validate_file(path, max_record_bytes=400))
    longest = list(records_at(path, report["stats"]["longest_lines"]).values())
    expected = sorted(lengths, reverse=True)[:LONGEST_KEPT]
    assert sorted((len(r["prompt"]) for r in longest), reverse=True) == expected
    assert all(r["completion"] == "a" for r in longest)
    assert len(report["stats"]["longest_lines"]) == LONGEST_KEPT
    sample = list(records_at(path, report["stats"]["sample_lines"]).values())  # a uniform sample of the good records
    assert len(sample) == LONGEST_KEPT and {len(r["prompt"]) for r in sample} <= set(lengths)
    assert dataclasses.asdict(validate_file(path, max_record_bytes=400))["stats"] == report["stats"]  # the same again

