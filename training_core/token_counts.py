"""Records counted in the model's own tokens, chat template included: what a job trains on.

A dataset's report counts tokens at about 4 characters each, since no model is known when it is
uploaded. That misses the chat template (role markers and turn ends on every turn) and a small
vocabulary's shorter tokens: on the test suite's short chats the template alone made jobs use ~1.5x
what they were priced at, and a tune study's default budget ran out a third of the way short. At
admission the model is known, so its tokenizer counts the dataset's longest records and a random
sample of them (located by the report) as the trainer will see them: the longest give the sequence
length a step is priced at, the sample how far the report's total is short.

The service prices jobs in its own process, in request handlers and in the study driver's loop
(between lease renewals), so this reads the model's `tokenizer.json` with `tokenizers` and renders
its chat template with jinja2 as transformers does (a sandboxed environment that trims blocks, its
`generation` tag and helpers), in milliseconds: importing transformers' AutoTokenizer takes seconds
and torch with it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from training_core.data import estimated_tokens, record_text, records_at


class ModelTokens:
    """A model's tokenizer and chat template, loaded from its directory without transformers."""

    def __init__(self, tokenizer: Any, template: Any | None, special_tokens: dict[str, str]):
        self.tokenizer, self.template, self.special_tokens = tokenizer, template, special_tokens

    @classmethod
    def load(cls, model_dir: Path) -> ModelTokens | None:
        """None without a `tokenizer.json` (the report's counts are used instead)."""
        from tokenizers import Tokenizer

        if not (model_dir / "tokenizer.json").is_file():
            return None
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        # transformers 5 writes the template beside the config; earlier versions inside it.
        template_path = model_dir / "chat_template.jinja"
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {name: value["content"] if isinstance(value, dict) else value for name, value in config.items()
                   if name.endswith("_token") and isinstance(value, str | dict)}
        return cls(Tokenizer.from_file(str(model_dir / "tokenizer.json")),
                   _compile(template) if template else None, special)

    def text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def conversation(self, turns: list[dict[str, Any]]) -> int:
        from jinja2 import TemplateError

        if self.template is not None:
            try:
                return self.text(self.template.render(messages=turns, add_generation_prompt=False,
                                                      **self.special_tokens))
            except TemplateError:  # a template that refuses these turns (a role it lacks): the job will say so
                pass
        return self.text(record_text({"messages": turns})) + 1  # no template: the trainer refuses it


def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training; rendered as is."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda format: datetime.now().strftime(format))
    return environment.from_string(template)


def record_tokens(model: ModelTokens, record: dict[str, Any]) -> int:
    """The tokens of the longest sequence one record trains on: a conversation through the chat
    template; a prompt with its completion, or with the longer of its chosen and rejected answers."""
    if "messages" in record:
        return model.conversation(record["messages"])
    if "text" in record:
        return model.text(record["text"]) + 1  # the end-of-sequence token
    answers = [record[name] for name in ("completion", "chosen", "rejected") if name in record] or [None]
    return max(_pair_tokens(model, record["prompt"], answer) for answer in answers)


def _pair_tokens(model: ModelTokens, prompt: str | list[dict[str, Any]], answer: Any) -> int:
    if isinstance(prompt, list):
        return model.conversation(prompt + (answer if isinstance(answer, list) else []))
    return model.text(prompt + (answer if isinstance(answer, str) else "")) + 1


@dataclass(frozen=True)
class Measured:
    """Located records counted in the model's tokens, against the report's counts of them."""

    longest: int
    """The longest of the located longest records, in the model's tokens."""
    longest_ratio: float
    """How many times the report's count the longest records are, at most."""
    sample_ratio: float
    """The sampled records' model tokens over their report tokens: what the report's total is short by."""


def measured_lengths(model_dir: str | Path, datasets: list[tuple[Path, dict[str, Any]]]) -> Measured | None:
    """The datasets' located records counted with the model's tokenizer; None when no report locates
    any (made before 2026-11-27) or the model has no tokenizer to count with."""
    longest: list[tuple[int, int]] = []
    sample: list[tuple[int, int]] = []
    tokenizer = _tokenizer_files(Path(model_dir))
    for path, report in datasets:
        stats = report.get("stats", {})
        counted = _counted(str(model_dir), tokenizer, str(path), tuple(stats.get("longest_lines") or ()),
                           tuple(stats.get("sample_lines") or ()))
        longest += counted[0]
        sample += counted[1]
    if not longest:
        return None
    longest_ratio = max(tokens / max(1, estimate) for tokens, estimate in longest)
    sample_ratio = (sum(tokens for tokens, _ in sample) / max(1, sum(estimate for _, estimate in sample))
                    if sample else longest_ratio)
    return Measured(max(tokens for tokens, _ in longest), longest_ratio, sample_ratio)


Counts = tuple[tuple[int, int], ...]
"""(model tokens, report tokens) of each of some located records."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tokenizer_files(model_dir: Path) -> tuple[tuple[int, int], ...]:
    """(modified ns, size) of each file `ModelTokens.load` reads, (0, 0) where there is none: part of
    the caches' keys, so a directory whose tokenizer or template is replaced is counted afresh."""
    stamps = []
    for name in TOKENIZER_FILES:
        try:
            stat = (model_dir / name).stat()
        except OSError:
            stamps.append((0, 0))
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


@functools.lru_cache(maxsize=256)
def _counted(model_dir: str, tokenizer: tuple[tuple[int, int], ...], snapshot: str, longest_lines: tuple[int, ...],
             sample_lines: tuple[int, ...]) -> tuple[Counts, Counts]:
    """The counts of a snapshot's located longest and sampled records, read in one pass. Cached:
    snapshots never change, and every trial of a study is priced with the same model and data;
    `tokenizer` (`_tokenizer_files`) keys the model directory's version."""
    model = _model_tokens(model_dir, tokenizer)
    if model is None or not longest_lines:
        return (), ()
    records = records_at(Path(snapshot), {*longest_lines, *sample_lines})

    def counts(lines: tuple[int, ...]) -> Counts:
        return tuple((record_tokens(model, records[line]), estimated_tokens(record_text(records[line])))
                     for line in lines if line in records)

    return counts(longest_lines), counts(sample_lines)


@functools.lru_cache(maxsize=8)
def _model_tokens(model_dir: str, tokenizer: tuple[tuple[int, int], ...]) -> ModelTokens | None:
    return ModelTokens.load(Path(model_dir))
