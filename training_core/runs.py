"""What every training method's `run` shares: trainer arguments, resuming, and the job's result.

    args = TrainingArguments(**runs.common_arguments(spec, device))     # or SFTConfig, DPOConfig, ...
    output, resumed_from = runs.train(trainer, spec, events)            # from the newest checkpoint, if any
    result = runs.outcome(callback, trainer.state, metrics)             # cancelled / capped / succeeded

Each method module stays readable top to bottom; only what would otherwise be written four times
lives here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerState,
)
from transformers.trainer_utils import TrainOutput

from training_core import attention, data, hardware
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.spec import JobError, JobResult, JobSpec

SAVE_TOTAL_LIMIT = 2
"""Two, not one: a run killed while writing a checkpoint still leaves the previous one whole."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written last by `Trainer._save_checkpoint`, after weights, optimizer and RNG state: its presence
# marks a checkpoint that is complete.
_TRAINER_STATE = "trainer_state.json"


def begin(started: float | None) -> tuple[float, str]:
    """(the process's start, the device): what every method does first. `started` is the
    `time.monotonic()` reading when the process began (caps and time to first step count from it);
    progress bars are off, since the events file reports progress."""
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return (time.monotonic() if started is None else started), hardware.pick_device()


def common_arguments(spec: JobSpec, device: str) -> dict[str, Any]:
    """TrainingArguments every method uses: the resolved hyperparameters, checkpoints, no hub, no tqdm.

    Gradient checkpointing is off unless the job asks for it (TRL turns it on by default): the
    models this service trains on one device fit without it, and it costs an extra forward pass.
    The optimizer is transformers' default, fused AdamW (one kernel over all parameters).
    """
    hyper = spec.hyperparameters
    bf16 = hardware.use_bf16(device, hyper.precision)
    return {
        "output_dir": spec.output_dir,
        "max_steps": hyper.max_steps,
        "learning_rate": hyper.learning_rate,
        "lr_scheduler_type": hyper.lr_scheduler,
        "warmup_steps": hyper.warmup_ratio,  # a float below 1 is a ratio of max_steps in transformers 5
        "weight_decay": hyper.weight_decay,
        "per_device_train_batch_size": hyper.per_device_batch_size,
        "per_device_eval_batch_size": 2 * hyper.per_device_batch_size,  # no activations kept for backward
        "gradient_accumulation_steps": hyper.gradient_accumulation_steps,
        "seed": hyper.seed,
        "bf16": bf16,
        # Explicit, so several CPU processes train as one job (gloo) rather than each on its own.
        "use_cpu": device == "cpu",
        "activation_checkpointing": hyper.gradient_checkpointing,
        # Liger's Triton kernels (fused RMSNorm, SwiGLU, RoPE, linear cross-entropy) where installed.
        "use_liger_kernel": device == "cuda" and hyper.liger_kernels and liger_kernels_installed(),
        "logging_steps": hyper.logging_steps,
        # A NaN or infinite loss is reported as it is (Trainer would log the window's other losses,
        # or 0), so that the job callback sees a diverged run and stops it.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": hyper.save_steps,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": "no",  # held-out figures are measured before and after training, by each `run`
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_pin_memory": device == "cuda",
        "report_to": "none",
        "disable_tqdm": True,
        "push_to_hub": False,
    }


def quiet(trainer: Trainer) -> Trainer:
    """With tqdm off, Trainer prints every log dict to stdout; the events file already carries them."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def load_model(spec: JobSpec, device: str, padding_free: bool = False
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and its tokenizer; `padding_free`: the job trains on padding-free rows (SFT),
    which picks the attention kernel (`training_core.attention`)."""
    # The frozen base of a LoRA run needs no fp32 master copy; trained weights keep one (see above).
    dtype = hardware.training_dtype(device, spec.hyperparameters.precision) if spec.adapter == "lora" \
        else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
        model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=dtype,
                                                     attn_implementation=attention_implementation(
                                                         spec, device, padding_free))
    except (OSError, ValueError) as error:
        where = "" if Path(spec.base_model).is_dir() else " (no such directory; as a hub id it failed too)"
        raise JobError("invalid_model", f"cannot load the base model {spec.base_model}{where}: {error}",
                       param="base_model") from error
    return model, tokenizer


def attention_implementation(spec: JobSpec, device: str, padding_free: bool = False) -> str:
    return attention.implementation(device, hardware.use_bf16(device, spec.hyperparameters.precision), padding_free)


def liger_kernels_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def load_records(spec: JobSpec, accepted: tuple[str, ...], max_eval_records: int
                 ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(format, training records, held-out records), all files in one of the method's `accepted` formats.

    The held-out set is `eval_fraction` of the records, drawn with the job's seed, and at most
    `max_eval_records`: evaluating it sits between the tool call and the first step, so its cost must
    stay small whatever the dataset's size."""
    formats: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for path in spec.train_files:
        try:
            file_format, examples = data.load_examples(Path(path))
        except data.DatasetError as error:
            raise JobError("invalid_dataset", str(error), param="train_files") from error
        formats[path] = file_format
        records += examples
    if len(set(formats.values())) > 1:
        listed = ", ".join(f"{Path(path).name} is {fmt}" for path, fmt in formats.items())
        raise JobError("invalid_dataset", f"the datasets of one job must share a format: {listed}",
                       param="train_files")
    data_format = next(iter(formats.values()))
    if data_format not in accepted:
        raise JobError("invalid_dataset", f"{spec.method} trains on {' or '.join(accepted)} records; these are "
                       f"{data_format}", param="train_files")

    fraction = spec.hyperparameters.eval_fraction
    held_out = min(max_eval_records, max(1, round(len(records) * fraction))) if fraction > 0 else 0
    if held_out >= len(records):
        held_out = 0  # too few records to hold any out: train on all, report no held-out loss
    order = list(range(len(records)))
    random.Random(spec.hyperparameters.seed).shuffle(order)
    eval_records = [records[i] for i in order[:held_out]]
    train_records = [records[i] for i in sorted(order[held_out:])]
    return data_format, train_records, eval_records


def lora_config(spec: JobSpec) -> LoraConfig | None:
    """The PEFT adapter a `lora` job trains (all linear layers by default); None for full training."""
    if spec.adapter != "lora":
        return None
    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")


def save_model(spec: JobSpec, trainer: Trainer, tokenizer: PreTrainedTokenizerBase
                ) -> tuple[Path, Path | None]:
    """The final model in `output_dir/model` (the adapter, with LoRA) and the merged copy if asked for."""
    model_dir = Path(spec.output_dir) / "model"
    trainer.save_model(str(model_dir))  # weights or adapter, config, tokenizer and chat template
    if not (spec.adapter == "lora" and spec.merge_adapter):
        return model_dir, None
    if not hardware.is_main_process():  # one process of a several-device job writes the merged copy
        return model_dir, Path(spec.output_dir) / "merged"
    merged_dir = Path(spec.output_dir) / "merged"
    # Merged into the base as stored (fp32, say), not into the bf16 copy training kept to save memory:
    # the merged model is then as precise as the base was, and equals base plus adapter exactly.
    base = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    return model_dir, merged_dir


def train(trainer: Trainer, spec: JobSpec, events: EventWriter) -> tuple[TrainOutput, int]:
    """Train to the end, resuming from the newest complete checkpoint in `output_dir` that a killed
    run left; (the trainer's output, the step resumed from, 0 for a fresh start)."""
    checkpoint = newest_checkpoint(Path(spec.output_dir))
    resumed_from = step_of(checkpoint) if checkpoint else 0
    if checkpoint is not None:
        # Announced again: a run killed between saving it and announcing it left the store without it.
        events.checkpoint(resumed_from, str(checkpoint), _saved_metrics(checkpoint))
        events.message(f"resuming from step {resumed_from}", step=resumed_from, path=str(checkpoint))
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return output, resumed_from


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The complete `checkpoint-N` with the highest N short of the last step, or None.

    A half-written one is passed over, and so is one at the last step (its run was killed before its
    result): resumed from there, transformers takes a step before it looks at max_steps, one past the
    job's end. The run resumes from the checkpoint before it and does those steps again instead."""
    if not output_dir.is_dir():
        return None
    resumable = [path for path in output_dir.iterdir() if _CHECKPOINT.match(path.name) and _steps_left(path)]
    return max(resumable, key=step_of, default=None)


def _steps_left(checkpoint: Path) -> bool:
    try:  # the trainer state is written last: a checkpoint without it (or cut off) is half-written
        state = json.loads((checkpoint / _TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return int(state["global_step"]) < int(state["max_steps"])


def _saved_metrics(checkpoint: Path) -> dict[str, Any]:
    """What the trainer last logged before saving the checkpoint (its loss, learning rate)."""
    state = json.loads((checkpoint / _TRAINER_STATE).read_text(encoding="utf-8"))
    logged = [entry for entry in state.get("log_history", []) if "loss" in entry]
    return {key: value for key, value in (logged[-1] if logged else {}).items() if key != "step"}


def step_of(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    assert match is not None
    return int(match.group(1))


def run_metrics(callback: JobCallback, state: TrainerState, device: str, parameters: int,
                trainable_parameters: int) -> dict[str, Any]:
    """Throughput, memory and utilisation: what every job records, on its events and on its model."""
    tokens_per_second = callback.tokens_per_second(state)
    return {
        "tokens_per_second": tokens_per_second,
        "tokens_per_cpu_second": callback.tokens_per_cpu_second(state),
        "peak_memory_bytes": hardware.peak_memory_bytes(device),
        "setup_peak_memory_bytes": callback.setup_peak_memory,
        "mfu": callback.mfu(tokens_per_second),
        "precision": "bf16" if callback.dtype == torch.bfloat16 else "fp32",
        "time_to_first_step_seconds": callback.time_to_first_step,
        "parameters": parameters,
        "trainable_parameters": trainable_parameters,
        "device": device,
        "devices": hardware.world_size(),
    }


def outcome(callback: JobCallback, state: TrainerState, metrics: dict[str, Any]) -> JobResult:
    """The result as far as training goes: cancelled, stopped at a cap (failed, checkpoint kept), or
    succeeded (the caller then saves the model and fills in `model_dir`)."""
    result = JobResult(status="succeeded", metrics=metrics, tokens_seen=callback.tokens_seen(state),
                       flops_used=callback.flops_used(state), steps=state.global_step)
    if callback.cancelled:
        result.status = "cancelled"
    elif callback.cap_reached is not None:
        result.status, result.error = "failed", callback.cap_reached.to_error()
    elif callback.diverged is not None:
        result.status, result.error = "failed", callback.diverged.to_error()
    return result
