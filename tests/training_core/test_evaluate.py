"""The eval child (`training_core.evaluate`) run in-process on the tiny model: chat items, caps, cancel."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import chat_records, write_jsonl
from training_core import evaluate
from training_core.events import EventWriter
from training_core.spec import CANCEL_FILE, Hyperparameters, JobSpec, Limits

SUITE = {"name": "chat", "dataset": "ds_x", "decoding": {"max_new_tokens": 6, "batch_size": 4},
         "kpis": [{"name": "rouge", "grader": {"type": "similarity"}},
                  {"name": "ppl", "grader": {"type": "perplexity"}, "direction": "lower"}]}


def _spec(tmp_path: Path, model: Path, items: Path, **limits: float) -> JobSpec:
    return JobSpec(job_id="job_test", method="eval", run_dir=str(tmp_path / "run"), output_dir=str(tmp_path / "out"),
                   base_model=str(model), train_files=[str(items)],
                   hyperparameters=Hyperparameters(learning_rate=0.0, max_steps=2, per_device_batch_size=4,
                                                   gradient_accumulation_steps=1, max_seq_length=64),
                   limits=Limits(**limits), options={"suite": SUITE, "models": [
                       {"role": "candidate", "ref": "tiny", "path": str(model), "base_path": None}]})


def test_chat_items_are_generated_in_batches_scored_and_written_per_item(tmp_path: Path, tiny_model: Path) -> None:
    items = write_jsonl(tmp_path / "chat.jsonl", chat_records(6))
    with EventWriter(tmp_path / "run") as events:
        result = evaluate.run(_spec(tmp_path, tiny_model, items), events)
    assert result.status == "succeeded", result.error
    run = result.metrics["runs"]["candidate"]
    assert run["items"] == 6 and run["kpis"]["ppl"] > 1.0 and run["composite"] == run["kpis"]["rouge"]
    rows = [json.loads(line) for line in Path(run["results_path"]).read_text(encoding="utf-8").splitlines()]
    assert [row["index"] for row in rows] == list(range(6))
    assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "What is a red-drop?"}]
    assert rows[0]["reference"].startswith("A red-drop") and set(rows[0]["scores"]) == {"rouge", "ppl"}
    assert result.steps == 2 and result.flops_used > 0 and result.tokens_seen > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
               if '"metrics"' in line]
    assert [m["data"]["step"] for m in metrics] == [1, 2]


def test_eval_stops_at_its_compute_cap_and_on_cancel(tmp_path: Path, tiny_model: Path) -> None:
    items = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    with EventWriter(tmp_path / "run") as events:
        capped = evaluate.run(_spec(tmp_path, tiny_model, items, max_flops=1.0), events)
    assert capped.status == "failed" and capped.error["code"] == "compute_cap_reached" and capped.steps == 1
    (tmp_path / "run" / CANCEL_FILE).touch()
    with EventWriter(tmp_path / "run") as events:
        cancelled = evaluate.run(_spec(tmp_path, tiny_model, items), events)
    assert cancelled.status == "cancelled" and cancelled.steps == 1
