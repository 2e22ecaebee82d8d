"""The switches that make training faster or smaller change speed and memory, never what is learned:
bf16 where measured faster, padding-free batches attended record by record, gradient checkpointing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import chat_records, write_jsonl
from training_core import attention, continued_pretrain, hardware, sft
from training_core.events import EventWriter
from training_core.spec import EVENTS_FILE, Hyperparameters, JobError, JobResult, JobSpec, LoraSpec


def _spec(tmp_path: Path, base_model: Path, method: str = "sft", **hyper: Any) -> JobSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if method == "sft":
        data = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))
    else:
        data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{m[0]['content']} {m[1]['content']}"}
                                                    for m in (r["messages"] for r in chat_records(48))])
    hyperparameters = Hyperparameters(**{
        "learning_rate": 3e-3, "max_steps": 6, "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
        "max_seq_length": 64, "save_steps": 100, "eval_fraction": 0.25, "warmup_ratio": 0.0, **hyper})
    return JobSpec(job_id="job-switches", method=method, run_dir=str(tmp_path / "run"),
                   output_dir=str(tmp_path / "run" / "output"), base_model=str(base_model), train_files=[str(data)],
                   hyperparameters=hyperparameters)


def _run(spec: JobSpec) -> tuple[JobResult, list[float]]:
    module = sft if spec.method == "sft" else continued_pretrain
    with EventWriter(spec.run_dir) as events:
        result = module.run(spec, events)
    assert result.status == "succeeded", result.error
    lines = (Path(spec.run_dir) / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
    losses = [event["data"]["loss"] for event in map(json.loads, lines) if "loss" in event["data"]]
    return result, losses


def test_padding_free_batches_train_exactly_like_padded_ones(tmp_path: Path, tiny_model: Path) -> None:
    runs = {free: _run(_spec(tmp_path / f"free-{free}", tiny_model, precision="fp32", padding_free=free))
            for free in (False, True)}

    (padded, padded_losses), (free, free_losses) = runs[False], runs[True]
    assert free_losses == pytest.approx(padded_losses, rel=1e-4)
    assert free.metrics["eval_loss_after"] == pytest.approx(padded.metrics["eval_loss_after"], rel=1e-4)
    assert free.tokens_seen == padded.tokens_seen  # the same records a step, no pad token counted
    assert free.metrics["precision"] == "fp32"


def test_bf16_training_follows_fp32_training(tmp_path: Path, tiny_model: Path) -> None:
    (_, fp32_losses), (bf16, bf16_losses) = (
        _run(_spec(tmp_path / precision, tiny_model, precision=precision)) for precision in ("fp32", "bf16"))

    assert bf16.metrics["precision"] == "bf16"
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.02)
    assert bf16.metrics["eval_loss_after"] < bf16.metrics["eval_loss_before"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sdpa_lets_each_record_of_a_row_attend_only_to_itself(tiny_model: Path, dtype: torch.dtype) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention.implementation(
        "cpu", dtype == torch.bfloat16)).eval()
    records = [torch.randint(10, 300, (length,)) for length in (7, 19, 12)]
    row = torch.cat(records)[None]
    positions = torch.cat([torch.arange(len(record)) for record in records])[None]
    edges = torch.tensor([0, 7, 26, 38], dtype=torch.int32)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        packed = model(input_ids=row, position_ids=positions, cu_seq_lens_q=edges, cu_seq_lens_k=edges,
                       max_length_q=19, max_length_k=19).logits[0].float()
        alone = torch.cat([model(input_ids=record[None]).logits[0].float() for record in records])

    assert torch.allclose(packed, alone, atol=1e-4 if dtype == torch.float32 else 5e-2)


def test_packed_sdpa_attends_in_fp32_under_bf16_autocast() -> None:
    """Autocast casts SDPA's inputs to bf16 whatever their dtype, and the CPU kernel's bf16 backward is
    the slow one: under autocast the attention must run in fp32, as if autocast were off."""
    module = torch.nn.Module()
    query, key, value = (torch.randn(1, 4, 26, 16) for _ in range(3))
    edges = torch.tensor([0, 7, 26], dtype=torch.int32)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = attention.packed_sdpa(module, query, key, value, None, cu_seq_lens_q=edges)
    in_fp32, _ = attention.packed_sdpa(module, query, key, value, None, cu_seq_lens_q=edges)

    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, in_fp32)


def test_gradient_checkpointing_trains_the_same_steps(tmp_path: Path, tiny_model: Path) -> None:
    (_, plain_losses), (_, checkpointed_losses) = (
        _run(_spec(tmp_path / f"gc-{on}", tiny_model, precision="fp32", gradient_checkpointing=on))
        for on in (False, True))

    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-4)


def test_gradient_checkpointing_with_lora_on_a_plain_trainer_trains_every_adapter_weight(
        tmp_path: Path, tiny_model: Path) -> None:
    spec = _spec(tmp_path, tiny_model, method="continued_pretrain", max_seq_length=32, gradient_checkpointing=True)
    spec.adapter, spec.lora = "lora", LoraSpec(r=4, alpha=8, dropout=0.0)

    result, _ = _run(spec)

    assert result.model_dir is not None
    adapter = load_file(Path(result.model_dir) / "adapter_model.safetensors")
    assert [name for name, weight in adapter.items() if "lora_B" in name and not weight.any()] == []


def test_precision_is_fp32_or_bf16_as_asked_and_anything_else_names_the_field() -> None:
    assert hardware.use_bf16("cpu", "fp32") is False
    assert hardware.use_bf16("cpu", "bf16") is True
    with pytest.raises(JobError) as raised:
        hardware.use_bf16("cpu", "fp16")
    assert raised.value.param == "hyperparameters.precision"


def test_the_cpu_probe_is_measured_once_a_machine_and_kept_in_the_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_CACHE_DIR", str(tmp_path))
    measured = hardware.cpu_matmul_probe()
    assert measured["fp32_flops"] > 0 and measured["bf16_flops"] > 0

    cache = tmp_path / "hardware.json"
    kept = json.loads(cache.read_text(encoding="utf-8"))
    [key] = kept
    kept[key] |= {"fp32_flops": 1.0, "bf16_flops": 2.0}  # a later process reads these, it does not measure
    cache.write_text(json.dumps(kept), encoding="utf-8")
    assert hardware.cpu_matmul_probe()["bf16_flops"] == 2.0
