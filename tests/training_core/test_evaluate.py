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


def test_a_chat_reference_is_scored_up_to_the_end_of_turn_fine_tuning_teaches(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    # SFT on chats trains the model to end its answer with the template's <|im_end|>, never with
    # end of text: perplexity must score the end the model was taught, or fine-tuning reads as a loss.
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = write_jsonl(tmp_path / "chat.jsonl", chat_records(1))
    with EventWriter(tmp_path / "run") as events:
        result = evaluate.run(_spec(tmp_path, tiny_model, items), events)
    row = json.loads(Path(result.metrics["runs"]["candidate"]["results_path"]).read_text(encoding="utf-8"))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(json.loads(row["prompt"]), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(row["reference"], add_special_tokens=False)["input_ids"] + [end_of_turn]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1:-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids)).item())
    assert math.isclose(row["scores"]["ppl"], expected, rel_tol=1e-4)
