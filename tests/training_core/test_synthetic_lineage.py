"""A synth job's lineage: records name their source chunk by reference, never by its text, and the
manifest names what the records were decontaminated against by id and hash."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import write_jsonl
from training_core.events import EventWriter
from training_core.spec import Hyperparameters, JobSpec, Limits
from training_core.synthetic import chunk_spans, read_source
from training_core.synthetic import run as run_synth

SUITE_SENTENCE = ("The east ring red-drop threshold is minus twenty-seven dBm for every customer the night "
                  "desk watches.")
PARAGRAPHS = [
    ("The field team walks out to the splice cabinet. They reseat the optical terminal. "
     f"{SUITE_SENTENCE} They log the light level in the Gridbook."),
    ("Quiet window work starts at one. The night desk parks tickets that wait on the customer. "
     "T2 tickets go to the field team."),
    "Splice cabinets are listed by SC code. Each code names a street and a cabinet number.",
]


def _options(docs: Path, suite_items: Path) -> dict[str, Any]:
    return {
        "task": "qa_from_documents", "num_records": 24, "max_generated": 200, "seed": 3, "batch_size": 16,
        "generator": {"type": "template", "describe": "template", "slots": {}, "templates": [
            {"question": "What does the Gridbook say right after this: {sentence}", "answer": "It says: {sentence}"}]},
        "rejected_generator": None,
        "task_options": {"output_format": "prompt_completion", "seeds_per_prompt": 3, "chunk_chars": 300,
                         "tools": [], "chosen": "generator", "rejected": "corruption", "rejected_model": None,
                         "system_prompt": None},
        "filters": {"near_duplicate": None, "diversity_rouge_l": None, "min_chars": 1, "max_chars": 20_000,
                    "score": None},
        "seed_examples": [],
        "sources": [{"dataset_id": "ds_docs", "content_hash": "docs-hash", "path": str(docs)}],
        "decontaminate": [],
        "decontaminate_suites": [{"suite_id": "suite_ring", "name": "east ring", "content_hash": "suite-hash",
                                  "dataset_id": "ds_items", "dataset_hash": "items-hash", "path": str(suite_items)}],
    }


def _run(tmp_path: Path, options: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = JobSpec(job_id="lineage", method="synth", run_dir=str(tmp_path / "run"), output_dir=str(tmp_path / "out"),
                   base_model="", train_files=[], hyperparameters=Hyperparameters(0.0, 200, 16, 1, 0),
                   limits=Limits(), options=options)
    with EventWriter(spec.run_dir) as events:
        result = run_synth(spec, events, time.monotonic())
    assert result.status == "succeeded", result.error
    out = Path(spec.output_dir)
    records = [json.loads(line) for line in (out / "dataset.jsonl").read_text(encoding="utf-8").splitlines()]
    return records, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_records_name_their_chunk_by_reference_and_carry_no_suite_sentence(tmp_path: Path) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": p} for p in PARAGRAPHS])
    items = write_jsonl(tmp_path / "items.jsonl", [{"prompt": "What is the east ring threshold?",
                                                     "reference": SUITE_SENTENCE}])
    records, manifest = _run(tmp_path, _options(docs, items))
    document, _ = read_source(docs, "qa_from_documents")

    from_the_suite_chunk = 0
    for record in records:
        # Nowhere in the record, metadata included: decontamination dropped the records that asked
        # about the suite sentence, and the chunk it sits in is not copied along.
        assert SUITE_SENTENCE not in json.dumps(record) and "twenty-seven" not in json.dumps(record)
        chunk = record["metadata"]["source_chunk"]
        assert set(chunk) == {"dataset_id", "dataset_hash", "index", "start", "end", "sha256"}
        assert (chunk["dataset_id"], chunk["dataset_hash"]) == ("ds_docs", "docs-hash")
        text = document[chunk["start"]:chunk["end"]]
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == chunk["sha256"]
        assert record["completion"].removeprefix("It says: ") in text
        from_the_suite_chunk += SUITE_SENTENCE in text
    assert from_the_suite_chunk > 0  # kept records from the chunk that holds the suite sentence
    assert manifest["dropped"]["decontamination"] > 0
    assert manifest["decontaminated_against"] == [
        {"kind": "eval_suite", "suite_id": "suite_ring", "name": "east ring", "content_hash": "suite-hash",
         "dataset_id": "ds_items", "dataset_hash": "items-hash", "items": 1}]


def test_chunks_are_spans_of_the_document_of_whole_paragraphs_within_the_size() -> None:
    long = " ".join(f"word{i}" for i in range(120))
    document = f"  First paragraph.  \n\nSecond one here.\n\n\n\n{long}\n\nLast."
    spans = chunk_spans(document, 100)
    pieces = [document[start:end] for start, end in spans]
    assert pieces[0] == "First paragraph.  \n\nSecond one here."
    assert all(0 < len(piece) <= 100 and piece == piece.strip() for piece in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(document.split())  # every word, once, in order
    assert [start for start, _ in spans] == sorted(start for start, _ in spans)
