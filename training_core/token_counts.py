"""Records counted in the model's own tokens, chat template included: what a job trains on.

A dataset's report counts tokens at about 4 characters each, since no model is known when it is
uploaded. That misses the chat template (role markers and turn ends on every turn) and a small
vocabulary's shorter tokens: on the test suite's short chats the template alone made jobs use ~1.5x
what they were priced at, and a tune study's default budget ran out a third of the way short. At
admission the model is known, so its tokenizer counts the dataset's longest records (located by the
report) as the trainer will see them.

transformers is imported on the first count, not with the service.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from training_core.data import longest_records, record_text


def heuristic_tokens(record: dict[str, Any]) -> int:
    """The report's count: about 4 characters a token (`data._Stats`)."""
    return math.ceil(len(record_text(record)) / 4)


def record_tokens(tokenizer: Any, record: dict[str, Any]) -> int:
    """The tokens of the longest sequence one record trains on: a conversation through the chat
    template; a prompt with its completion, or with the longer of its chosen and rejected answers."""
    if "messages" in record:
        return _conversation_tokens(tokenizer, record["messages"])
    if "text" in record:
        return _text_tokens(tokenizer, record["text"]) + 1  # the end-of-sequence token
    answers = [record[name] for name in ("completion", "chosen", "rejected") if name in record] or [None]
    return max(_pair_tokens(tokenizer, record["prompt"], answer) for answer in answers)


def _pair_tokens(tokenizer: Any, prompt: str | list[dict[str, Any]], answer: Any) -> int:
    if isinstance(prompt, list):
        return _conversation_tokens(tokenizer, prompt + (answer if isinstance(answer, list) else []))
    text = prompt + (answer if isinstance(answer, str) else "")
    return _text_tokens(tokenizer, text) + 1


def _conversation_tokens(tokenizer: Any, turns: list[dict[str, Any]]) -> int:
    from jinja2 import TemplateError

    if tokenizer.chat_template:
        try:
            return _text_tokens(tokenizer, tokenizer.apply_chat_template(turns, tokenize=False))
        except TemplateError:  # a template that refuses these turns (a role it lacks): the job will say so
            pass
    return _text_tokens(tokenizer, record_text({"messages": turns})) + 1  # no template: the trainer refuses it


def _text_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def measured_lengths(model_dir: str | Path, datasets: list[tuple[Path, dict[str, Any]]]) -> tuple[int, float] | None:
    """(the longest record in the model's tokens, how many times the reports' counts that is at most)
    over the datasets' located longest records; None when no report locates any (made before
    2026-11-27) or the model has no tokenizer to count with."""
    counts = [count for path, report in datasets for count in _counted(
        str(model_dir), str(path), tuple(report.get("stats", {}).get("longest_lines") or ()))]
    if not counts:
        return None
    return max(tokens for tokens, _ in counts), max(tokens / max(1, estimate) for tokens, estimate in counts)


@functools.lru_cache(maxsize=256)
def _counted(model_dir: str, snapshot: str, lines: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(model tokens, report tokens) of each located record. Cached: snapshots never change, and
    every trial of a study is priced with the same model and data."""
    tokenizer = _tokenizer(model_dir)
    if tokenizer is None or not lines:
        return ()
    return tuple((record_tokens(tokenizer, record), heuristic_tokens(record))
                 for record in longest_records(Path(snapshot), lines))


@functools.lru_cache(maxsize=8)
def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None
