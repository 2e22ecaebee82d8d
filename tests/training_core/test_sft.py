"""Supervised fine-tuning as the service runs it: `python -m training_core SPEC.json` in a child
process, talking back through events.jsonl and result.json; and, where a child would only add its
start-up time, `sft.run` in this process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import chat_records, wait_until, write_jsonl
from tests.events import read_events
from training_core import sft
from training_core.__main__ import main
from training_core.events import EventWriter, metric_history
from training_core.spec import (
    CANCEL_FILE,
    SPEC_FILE,
    Hyperparameters,
    JobResult,
    JobSpec,
    Limits,
    LoraSpec,
)

METRIC_KEYS = {"step", "max_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds",
               "tokens_seen", "flops_used"}


def _spec(tmp_path: Path, base_model: Path, **changes: Any) -> JobSpec:
    """48 chat records about six facts, a quarter held out; 20 steps of 4 records of at most 64 tokens."""
    hyper: dict[str, Any] = {
        "learning_rate": 3e-3, "max_steps": 20, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_seq_length": 64, "save_steps": 10, "eval_fraction": 0.25, "warmup_ratio": 0.0}
    hyper |= changes.pop("hyperparameters", {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))
    run_dir = tmp_path / "run"
    return JobSpec(**{"job_id": "job-test", "method": "sft", "run_dir": str(run_dir),
                      "output_dir": str(run_dir / "output"), "base_model": str(base_model),
                      "train_files": [str(data)], "hyperparameters": Hyperparameters(**hyper), **changes})


def _start_child(spec: JobSpec) -> subprocess.Popen[bytes]:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.write(run_dir / SPEC_FILE)
    # One intra-op thread: on a two-core machine whose second core is busy elsewhere (another job, a
    # noisy neighbour), two threads wait on each other at every op and a 30 ms step can take seconds.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (run_dir / "child.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "training_core", str(run_dir / SPEC_FILE)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env)


def _run_child(spec: JobSpec) -> JobResult:
    proc = _start_child(spec)
    assert proc.wait(timeout=300) == 0, _child_log(spec)
    result = JobResult.read(Path(spec.run_dir))
    assert result is not None, _child_log(spec)
    return result


def _child_log(spec: JobSpec) -> str:
    return (Path(spec.run_dir) / "child.log").read_text(encoding="utf-8", errors="replace")[-4000:]


def _events(spec: JobSpec) -> list[dict[str, Any]]:
    return read_events(spec.run_dir)


def _messages(spec: JobSpec, start: str) -> list[dict[str, Any]]:
    return [e for e in _events(spec) if e["type"] == "message" and e["message"].startswith(start)]


def _run_in_process(spec: JobSpec) -> JobResult:
    with EventWriter(spec.run_dir) as events:
        return sft.run(spec, events)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_fine_tuning_in_a_child_lowers_held_out_loss_and_changes_every_weight(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model)

    result = _run_child(spec)

    assert result.status == "succeeded", result.error
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert result.steps == 20
    before = load_file(tiny_model / "model.safetensors")
    assert result.model_dir is not None
    model_dir = Path(result.model_dir)
    after = load_file(model_dir / "model.safetensors")
    assert before.keys() == after.keys()
    assert [name for name in before if torch.equal(before[name], after[name])] == []
    # What the service prices a job with: 6 x parameters a token, here from the model itself.
    assert result.flops_used == pytest.approx(6 * result.metrics["parameters"] * result.tokens_seen)
    for key in ("train_loss", "tokens_per_second", "peak_memory_bytes", "mfu", "train_runtime_seconds",
                "time_to_first_step_seconds"):
        assert result.metrics[key] > 0, key

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt: Any = tokenizer.apply_chat_template([{"role": "user", "content": "What is a red-drop?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    steps = [e["data"] for e in _events(spec) if e["type"] == "metrics" and "loss" in e["data"]]
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert all(m.keys() >= METRIC_KEYS for m in steps)
    assert steps[-1]["tokens_seen"] == result.tokens_seen
    evaluations = [e["data"]["eval_loss"] for e in _events(spec) if "eval_loss" in e["data"]]
    assert evaluations == [result.metrics["eval_loss_before"], result.metrics["eval_loss_after"]]
    checkpoints = [e["data"] for e in _events(spec) if e["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [10, 20]
    assert all(Path(c["path"], "trainer_state.json").exists() for c in checkpoints)
    assert _messages(spec, "first optimizer step")[0]["data"]["step"] == 1


def test_lora_trains_only_the_adapter_and_its_merged_copy_matches_it(
        tmp_path: Path, tiny_model: Path) -> None:
    base_hash = _sha256(tiny_model / "model.safetensors")
    spec = _spec(tmp_path, tiny_model, adapter="lora", merge_adapter=True,
                 lora=LoraSpec(r=8, alpha=16, dropout=0.0), hyperparameters={"learning_rate": 1e-2})

    result = _run_in_process(spec)

    assert result.status == "succeeded", result.error
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert result.metrics["trainable_parameters"] < result.metrics["parameters"] / 2
    assert _sha256(tiny_model / "model.safetensors") == base_hash
    assert result.model_dir is not None
    model_dir = Path(result.model_dir)
    assert (model_dir / "adapter_config.json").exists()
    final = load_file(model_dir / "adapter_model.safetensors")
    assert final and all("lora_" in name for name in final)  # the adapter holds no base weights
    # lora_B starts at zero; every adapter tensor moved between the mid-run checkpoint and the end.
    assert [name for name, t in final.items() if "lora_B" in name and not t.any()] == []
    middle = load_file(Path(spec.output_dir) / "checkpoint-10" / "adapter_model.safetensors")
    assert [name for name in final if torch.equal(final[name], middle[name])] == []

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), model_dir).eval()
    assert result.merged_dir is not None
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tokenizer("A red-drop is a customer whose light level", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)


def test_tokens_seen_counts_the_non_padding_tokens_of_every_trained_batch(
        tmp_path: Path, tiny_model: Path) -> None:
    # One epoch exactly (48 records, 4 a step): whatever the order, every record is trained once.
    spec = _spec(tmp_path, tiny_model,
                 hyperparameters={"max_steps": 12, "eval_fraction": 0.0, "save_steps": 100})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered: list[Any] = [tokenizer.apply_chat_template(r["messages"], return_dict=True)
                           for r in chat_records(48)]
    expected = sum(min(64, len(r["input_ids"])) for r in rendered)

    result = _run_in_process(spec)

    assert result.status == "succeeded", result.error
    assert result.tokens_seen == expected
    assert result.metrics["eval_loss_before"] is None  # nothing held out, nothing to report


def test_packed_records_see_only_themselves(tmp_path: Path, tiny_model: Path) -> None:
    # Packing puts several records into one sequence with no attention mask; each record must still attend
    # only to itself. transformers builds that block-diagonal mask from the position ids, but only when
    # the forward pass has no cache (TRL passes use_cache=False; the model's config says True). With a
    # leaking mask the packed held-out loss differs in the third decimal (6.193 against 6.175 here).
    losses = {}
    for packing in (False, True):
        # One evaluation batch holds all 12 held-out records, untruncated, either way: both losses are
        # then the mean over the same tokens.
        spec = _spec(tmp_path / f"packing-{packing}", tiny_model, hyperparameters={
            "max_steps": 1, "per_device_batch_size": 8, "max_seq_length": 256, "packing": packing,
            "save_steps": 100})
        result = _run_in_process(spec)
        assert result.status == "succeeded", result.error
        losses[packing] = result.metrics["eval_loss_before"]

    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_cancel_file_stops_the_child_and_the_result_says_cancelled(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, hyperparameters={"max_steps": 5000, "save_steps": 5000})
    proc = _start_child(spec)
    wait_until(lambda: any(e["type"] == "metrics" and "loss" in e["data"] for e in _events(spec)),
               interval=0.05)

    (Path(spec.run_dir) / CANCEL_FILE).touch()

    assert proc.wait(timeout=120) == 0, _child_log(spec)
    result = JobResult.read(Path(spec.run_dir))
    assert result is not None and result.status == "cancelled"
    assert 1 <= result.steps < 5000
    assert result.model_dir is None and not (Path(spec.output_dir) / "model").exists()
    assert _messages(spec, "cancel requested")


def test_the_wall_clock_cap_fails_the_run_and_keeps_a_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    # Loading alone takes longer than a second, so the cap is reached by the end of the first step.
    spec = _spec(tmp_path, tiny_model, limits=Limits(max_seconds=1.0),
                 hyperparameters={"max_steps": 5000, "save_steps": 5000})

    result = _run_child(spec)

    assert result.status == "failed"
    assert result.error is not None
    assert result.error["code"] == "compute_cap_reached"
    assert result.error["param"] == "limits.max_seconds"
    assert "max_seconds cap reached: the cap is 1 seconds" in result.error["message"]
    assert result.steps == 1
    checkpoint = Path(spec.output_dir) / f"checkpoint-{result.steps}"
    assert (checkpoint / "trainer_state.json").exists()
    assert [e["data"]["path"] for e in _events(spec) if e["type"] == "checkpoint"] == [str(checkpoint)]


def test_a_learning_rate_that_makes_training_diverge_fails_the_run_naming_the_field(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, hyperparameters={"learning_rate": 1e308, "max_steps": 6, "save_steps": 100})

    result = _run_in_process(spec)

    assert result.status == "failed" and result.error is not None and result.model_dir is None
    assert (result.error["code"], result.error["param"]) == ("diverged", "hyperparameters.learning_rate")
    assert "it was 1e+308" in result.error["message"]
    assert result.steps < 6  # stopped at the first step whose loss or gradient is not a number
    losses = [e["data"]["loss"] for e in _events(spec) if e["type"] == "metrics" and "loss" in e["data"]]
    assert losses[-1] is None  # NaN, written as null, rather than a made-up 0.0


@pytest.mark.parametrize("cap", ["max_tokens", "max_flops"])
def test_a_token_or_flop_cap_stops_the_run_before_it_passes_the_cap(tmp_path: Path, tiny_model: Path,
                                                                    cap: str) -> None:
    limits = Limits(max_tokens=500) if cap == "max_tokens" else Limits(max_flops=500 * 1000.0)
    spec = _spec(tmp_path, tiny_model, limits=limits, flops_per_token=1000.0,
                 hyperparameters={"max_steps": 100, "save_steps": 100})

    result = _run_in_process(spec)

    assert result.status == "failed"
    assert result.error is not None and result.error["param"] == f"limits.{cap}"
    assert 0 < result.tokens_seen <= 500
    assert result.flops_used == 1000.0 * result.tokens_seen
    assert (Path(spec.output_dir) / f"checkpoint-{result.steps}" / "trainer_state.json").exists()


def test_a_run_killed_after_its_last_checkpoint_trains_again_to_max_steps_and_no_step_past_it(
        tmp_path: Path, tiny_model: Path) -> None:
    # Killed between its checkpoint at max_steps and its result: the next run resumed from that
    # checkpoint, and transformers took a step before it looked at max_steps (step 7 of 6).
    spec = _spec(tmp_path, tiny_model, hyperparameters={"max_steps": 6, "save_steps": 2})
    assert _run_in_process(spec).status == "succeeded"
    assert (Path(spec.output_dir) / "checkpoint-6" / "trainer_state.json").exists()
    (Path(spec.run_dir) / "result.json").unlink(missing_ok=True)
    written = len(_events(spec))

    result = _run_in_process(spec)

    assert result.status == "succeeded" and result.steps == 6
    second_run = _events(spec)[written:]
    steps = [e["data"]["step"] for e in second_run if e["type"] == "metrics" and "loss" in e["data"]]
    assert [e["data"]["step"] for e in second_run if e["message"].startswith("resuming from step")] == [4]
    # The checkpoint it resumed from is announced again (its first announcement may have been lost).
    assert next(e["data"]["step"] for e in second_run if e["type"] == "checkpoint") == 4
    assert steps == [5, 6]
    assert [s for s, _ in metric_history(_events(spec), "loss")] == list(range(1, 7))


def test_a_run_killed_after_a_checkpoint_resumes_from_it_on_the_same_spec(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, hyperparameters={"max_steps": 60, "save_steps": 5})
    first = _start_child(spec)
    # Killed two steps past a checkpoint, so the resumed run does those steps again.
    wait_until(lambda: any(e["type"] == "metrics" and e["data"].get("step", 0) % 5 == 2 and e["data"]["step"] > 5
                           for e in _events(spec)), interval=0.02)
    first.kill()
    first.wait(timeout=30)
    assert JobResult.read(Path(spec.run_dir)) is None, "the first run finished before it could be killed"
    # A kill in the middle of a save leaves a checkpoint without its trainer state: it must be passed over.
    half_written = Path(spec.output_dir) / "checkpoint-1000"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"")

    result = _run_child(spec)

    assert result.status == "succeeded", result.error
    assert result.steps == 60
    events = _events(spec)
    resumed = [i for i, e in enumerate(events) if e["message"].startswith("resuming from step ")]
    assert len(resumed) == 1
    step = events[resumed[0]]["data"]["step"]
    assert step >= 5 and step % 5 == 0
    second_run = [e["data"] for e in events[resumed[0]:] if e["type"] == "metrics" and "loss" in e["data"]]
    assert [m["step"] for m in second_run] == list(range(step + 1, 61))
    # This run's usage only: its first step's count is one batch's tokens, not the checkpoint's total.
    assert 0 < second_run[0]["tokens_seen"] <= 4 * 64
    assert second_run[-1]["tokens_seen"] == result.tokens_seen
    # The steps the first run did after its checkpoint are done again; the events say which run and
    # from where, so the history holds each step once, with the value of the run that kept it.
    first_run = [e["data"] for e in events[:resumed[0]] if e["type"] == "metrics" and "loss" in e["data"]]
    assert first_run[-1]["step"] > step, "the first run was killed before it did a step past its checkpoint"
    assert {m["resumed_from"] for m in second_run} == {step} and {m["resumed_from"] for m in first_run} == {0}
    assert len({m["run"] for m in first_run}) == len({m["run"] for m in second_run}) == 1
    assert first_run[0]["run"] != second_run[0]["run"]
    history = metric_history(events, "loss")
    assert [s for s, _ in history] == list(range(1, 61))
    assert history[step:] == [(m["step"], m["loss"]) for m in second_run]


def test_a_dataset_the_trainer_cannot_read_fails_naming_the_line_to_fix(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model)
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    write_jsonl(Path(spec.train_files[0]), [no_reply])
    spec.write(tmp_path / SPEC_FILE)

    assert main([str(tmp_path / SPEC_FILE)]) == 0

    result = JobResult.read(Path(spec.run_dir))
    assert result is not None and result.status == "failed" and result.error is not None
    assert result.error["code"] == "invalid_dataset"
    assert result.error["param"] == "train_files"
    assert "line 1" in result.error["message"]


def test_a_base_model_that_is_not_there_fails_naming_the_field(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tmp_path / "no-such-model")
    spec.write(tmp_path / SPEC_FILE)

    assert main([str(tmp_path / SPEC_FILE)]) == 0

    result = JobResult.read(Path(spec.run_dir))
    assert result is not None and result.error is not None
    assert (result.error["code"], result.error["param"]) == ("invalid_model", "base_model")
    assert "no such directory" in result.error["message"]


def test_an_unknown_method_fails_with_the_methods_there_are(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, method="distill")
    spec.write(tmp_path / SPEC_FILE)

    assert main([str(tmp_path / SPEC_FILE)]) == 0

    result = JobResult.read(Path(spec.run_dir))
    assert result is not None and result.error is not None
    assert (result.error["code"], result.error["param"]) == ("unsupported_method", "method")
    assert "sft" in result.error["message"]


def test_an_error_inside_training_fails_the_run_with_its_message(tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, hyperparameters={"learning_rate": -1.0})
    spec.write(tmp_path / SPEC_FILE)

    assert main([str(tmp_path / SPEC_FILE)]) == 0

    result = JobResult.read(Path(spec.run_dir))
    assert result is not None and result.status == "failed" and result.error is not None
    assert result.error["code"] == "training_error"
    assert "learning rate" in result.error["message"].lower()
    assert _events(spec)[-1]["message"] == "finished: failed"
