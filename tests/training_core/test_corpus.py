"""Corpora streamed from disk: token files built once per snapshot and tokenizer, blocks read from them
as packing in memory would cut them, and pre-training jobs that reuse the files and resume on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.conftest import CHAT_FACTS, write_jsonl
from tests.events import read_events
from training_core import continued_pretrain, corpus, language_modeling, pretrain
from training_core.events import EventWriter
from training_core.spec import EVENTS_FILE, Hyperparameters, JobError, JobSpec


def _documents(count: int, offset: int = 0) -> list[str]:
    facts = [f"{question} {answer}" for question, answer in CHAT_FACTS]
    return [f"Note {offset + i}. " + " ".join(facts[(offset + i + k) % len(facts)] for k in range(1 + i % 4))
            for i in range(count)]


def _snapshots(tmp_path: Path) -> list[Path]:
    """Two snapshot files of different types: 60 JSONL documents and 40 paragraphs of plain text."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": text} for text in _documents(60)])
    text = tmp_path / "b.txt"
    text.write_text("\n\n".join(_documents(40, offset=60)) + "\n", encoding="utf-8")
    return [jsonl, text]


def _spec(tmp_path: Path, method: str, base_model: str, train_files: list[Path], **hyper: Any) -> JobSpec:
    run_dir = tmp_path / "run"
    hyperparameters = Hyperparameters(**{
        "learning_rate": 3e-3, "max_steps": 4, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_seq_length": 32, "save_steps": 2, "eval_fraction": 0.1, "warmup_ratio": 0.0, **hyper})
    return JobSpec(job_id="job-corpus", method=method, run_dir=str(run_dir), output_dir=str(run_dir / "output"),
                   base_model=base_model, train_files=[str(path) for path in train_files],
                   hyperparameters=hyperparameters, options={"preset": "tiny", "vocab_size": 600})


def _events(spec: JobSpec) -> list[dict[str, Any]]:
    return read_events(spec.run_dir)


def _token_file_events(spec: JobSpec) -> list[dict[str, Any]]:
    return [e["data"] for e in _events(spec) if "reused" in e["data"]]


def test_token_blocks_equal_in_memory_packing(tmp_path: Path, tiny_model: Path) -> None:
    snapshots = _snapshots(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = _spec(tmp_path, "continued_pretrain", str(tiny_model), snapshots)
    held_out = corpus.hold_out(snapshots, 0.1, 512, seed=3)
    assert held_out.documents == 100 and len(held_out.ordinals) == 10

    with EventWriter(tmp_path / "events") as events:
        files = [corpus.token_file(path, tokenizer, spec, events) for path in snapshots]
    blocks = corpus.TokenBlocks(files, 32, skip=held_out.ordinals)

    everything = _documents(60) + _documents(40, offset=60)
    assert held_out.texts == [everything[i] for i in sorted(held_out.ordinals)]
    training = [text for i, text in enumerate(everything) if i not in held_out.ordinals]
    stream = language_modeling.token_stream(tokenizer, training)
    expected = [stream[start:start + 32] for start in range(0, len(stream) - 31, 32)]
    assert len(blocks) == len(expected) > 10
    assert [blocks[i]["input_ids"].tolist() for i in range(len(blocks))] == expected
    assert all(blocks[i]["labels"].tolist() == expected[i] for i in range(len(blocks)))
    # The whole corpus is on disk, held-out documents included: other hold-outs reuse the same file.
    assert sum(file.documents for file in files) == 100
    assert sum(file.tokens for file in files) == len(language_modeling.token_stream(tokenizer, everything))


def test_a_corpus_too_short_for_one_block_fails_naming_the_field(tmp_path: Path, tiny_model: Path) -> None:
    snapshot = write_jsonl(tmp_path / "short.jsonl", [{"text": "A few words."}])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with EventWriter(tmp_path / "events") as events:
        files = [corpus.token_file(snapshot, tokenizer, _spec(tmp_path, "pretrain", "", [snapshot]), events)]

    with pytest.raises(JobError) as raised:
        corpus.TokenBlocks(files, 512)
    assert raised.value.param == "hyperparameters.max_seq_length"


def test_a_record_that_is_not_text_fails_naming_its_file_and_line(tmp_path: Path) -> None:
    snapshot = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"prompt": "p", "completion": "c"}])

    with pytest.raises(JobError) as raised:
        corpus.hold_out([snapshot], 0.1, 512, seed=0)
    assert "mixed.jsonl line 2" in raised.value.message and raised.value.param == "train_files"


def test_a_second_job_on_the_same_snapshot_and_tokenizer_reuses_the_token_file(
        tmp_path: Path, tiny_model: Path) -> None:
    snapshots = _snapshots(tmp_path / "data")
    first = _spec(tmp_path / "first", "continued_pretrain", str(tiny_model), snapshots)
    second = _spec(tmp_path / "second", "continued_pretrain", str(tiny_model), snapshots, seed=1)

    with EventWriter(first.run_dir) as events:
        assert continued_pretrain.run(first, events).status == "succeeded"
    built = _token_file_events(first)
    stamps = {data["path"]: Path(data["path"]).stat().st_mtime_ns for data in built}
    with EventWriter(second.run_dir) as events:
        assert continued_pretrain.run(second, events).status == "succeeded"

    assert [data["reused"] for data in built] == [False, False]
    assert [data["reused"] for data in _token_file_events(second)] == [True, True]
    assert {path: Path(path).stat().st_mtime_ns for path in stamps} == stamps
    # Beside each snapshot, keyed by the tokenizer.
    assert sorted(Path(path).parent for path in stamps) == [tmp_path / "data"] * 2


def test_a_token_file_goes_to_the_cache_dir_when_the_spec_names_one(tmp_path: Path, tiny_model: Path) -> None:
    snapshots = _snapshots(tmp_path / "data")
    spec = _spec(tmp_path, "continued_pretrain", str(tiny_model), snapshots[:1])
    spec.token_cache_dir = str(tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    with EventWriter(tmp_path / "events") as events:
        built = corpus.token_file(snapshots[0], tokenizer, spec, events)
        again = corpus.token_file(snapshots[0], tokenizer, spec, events)

    assert built == again and built.tokens_path.parent == tmp_path / "cache"
    assert not list((tmp_path / "data").glob("*.tokens-*"))


def test_a_pretrain_job_killed_after_a_checkpoint_resumes_on_its_token_file(tmp_path: Path) -> None:
    snapshots = _snapshots(tmp_path / "data")
    spec = _spec(tmp_path, "pretrain", "", snapshots)
    with EventWriter(spec.run_dir) as events:
        whole = pretrain.run(spec, events)
    assert whole.status == "succeeded", whole.error
    losses = {e["data"]["step"]: e["data"]["loss"] for e in _events(spec) if "loss" in e["data"]}

    # As if killed after checkpoint-2: the later checkpoint and the saved model never happened.
    output = Path(spec.output_dir)
    for leftover in ("checkpoint-4", "model"):
        for path in sorted((output / leftover).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (output / leftover).rmdir()
    (Path(spec.run_dir) / EVENTS_FILE).unlink()
    with EventWriter(spec.run_dir) as events:
        resumed = pretrain.run(spec, events)

    assert resumed.status == "succeeded", resumed.error
    assert any(e["message"] == "resuming from step 2" for e in _events(spec))
    assert [data["reused"] for data in _token_file_events(spec)] == [True, True]
    # The same blocks in the same order after the checkpoint: the resumed steps train exactly alike.
    resumed_losses = {e["data"]["step"]: e["data"]["loss"] for e in _events(spec) if "loss" in e["data"]}
    assert sorted(resumed_losses) == [3, 4]
    assert [resumed_losses[step] for step in (3, 4)] == pytest.approx([losses[3], losses[4]], rel=1e-4)
    assert resumed.metrics["train_blocks"] == whole.metrics["train_blocks"]


def test_a_second_pretrain_on_the_same_snapshot_reuses_its_tokenizer_and_token_files(tmp_path: Path) -> None:
    snapshots = _snapshots(tmp_path / "data")
    first, second = (_spec(tmp_path / name, "pretrain", "", snapshots, learning_rate=rate)
                     for name, rate in (("first", 3e-3), ("second", 1e-3)))
    other_tokens = _spec(tmp_path / "other", "pretrain", "", snapshots)
    other_tokens.options = {"preset": "tiny", "vocab_size": 600, "special_tokens": ["<|ticket|>"]}

    for spec in (first, second, other_tokens):
        with EventWriter(spec.run_dir) as events:
            assert pretrain.run(spec, events).status == "succeeded"

    def tokenizer_event(spec: JobSpec) -> dict[str, Any]:
        return next(e["data"] for e in _events(spec) if "tokenizer_reused" in e["data"])

    assert [tokenizer_event(spec)["tokenizer_reused"] for spec in (first, second, other_tokens)] == [False, True, False]
    assert tokenizer_event(first)["tokenizer_dir"] == tokenizer_event(second)["tokenizer_dir"]
    assert Path(tokenizer_event(first)["tokenizer_dir"]).parent == tmp_path / "data"
    assert [data["reused"] for data in _token_file_events(second)] == [True, True]
    assert [data["reused"] for data in _token_file_events(other_tokens)] == [False, False]
    first_tokenizer, second_tokenizer = (AutoTokenizer.from_pretrained(Path(spec.output_dir) / "model")
                                         for spec in (first, second))
    assert corpus.tokenizer_key(first_tokenizer) == corpus.tokenizer_key(second_tokenizer)
    assert "<|ticket|>" in AutoTokenizer.from_pretrained(Path(other_tokens.output_dir) / "model").get_vocab()
    assert "<|ticket|>" not in first_tokenizer.get_vocab()
