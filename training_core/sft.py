"""Supervised fine-tuning of a causal language model with TRL's SFTTrainer, full or LoRA.

    python -m training_core SPEC.json        # a JobSpec with "method": "sft"

Read top to bottom: `run` loads the model and the records, holds out an evaluation set, measures
the held-out loss, trains (resuming from the newest checkpoint in `output_dir` when a killed run
left one), measures the held-out loss again, and saves the model to `output_dir/model` (with LoRA:
the adapter there and, on request, a merged full model in `output_dir/merged`).

Choices a reader would otherwise have to dig for:

- Chat records train on the assistant's turns only when the tokenizer's chat template marks them
  (`{% generation %}`, as the presets' template does); otherwise on the whole conversation.
  Prompt-completion records train on the completion (TRL's default).
- The held-out set is `eval_fraction` of the records, drawn with the job's seed, and at most
  `MAX_EVAL_RECORDS`: the evaluation before training sits between the tool call and the first
  optimizer step, so its cost must stay small whatever the dataset's size.
- Gradient checkpointing is off (TRL turns it on by default): the presets and the models this
  service fine-tunes on one device fit without it, and it costs about a fifth of the throughput.
- Full fine-tuning keeps fp32 master weights (bf16 autocast on GPUs that have it); LoRA on such a
  GPU loads the frozen base in bf16, since it needs no master copy, gradients or optimizer state.
"""

from __future__ import annotations

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
)
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers

from training_core import data, hardware
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.spec import JobError, JobResult, JobSpec

MAX_EVAL_RECORDS = 256
SAVE_TOTAL_LIMIT = 2
"""Two, not one: a run killed while writing a checkpoint still leaves the previous one whole."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written last by `Trainer._save_checkpoint`, after weights, optimizer and RNG state: its presence
# marks a checkpoint that is complete.
_TRAINER_STATE = "trainer_state.json"


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    """Fine-tune `spec.base_model` on `spec.train_files`; `started` is the process's `time.monotonic()`
    start, from which the caps and the time to the first optimizer step count."""
    started = time.monotonic() if started is None else started
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    device = hardware.pick_device()

    model, tokenizer = _load_model(spec, device)
    data_format, train_records, eval_records = _load_data(spec, tokenizer)
    events.message(f"loaded {len(train_records)} training and {len(eval_records)} held-out "
                   f"{data_format} records", format=data_format, train_records=len(train_records),
                   eval_records=len(eval_records))
    parameters = model.num_parameters()
    flops_per_token = spec.flops_per_token or 6.0 * parameters
    callback = JobCallback(events, spec, flops_per_token, started)
    trainer = _build_trainer(spec, model, tokenizer, data_format, train_records, eval_records, callback,
                             device)

    eval_loss_before = _evaluate(trainer, eval_records)
    checkpoint = _newest_checkpoint(Path(spec.output_dir))
    resumed_from = _step_of(checkpoint) if checkpoint else 0
    if checkpoint is not None:
        events.message(f"resuming from step {resumed_from}", step=resumed_from, path=str(checkpoint))
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    state = trainer.state
    metrics: dict[str, Any] = {
        "eval_loss_before": eval_loss_before,
        "train_loss": output.training_loss if state.global_step > resumed_from else None,
        "tokens_per_second": callback.tokens_per_second(state),
        "train_runtime_seconds": output.metrics["train_runtime"],
        "time_to_first_step_seconds": callback.time_to_first_step,
        "peak_memory_bytes": hardware.peak_memory_bytes(device),
        "parameters": parameters,
        # PEFT injects the adapter into this same module tree and freezes the rest.
        "trainable_parameters": model.num_parameters(only_trainable=True),
        "device": device,
    }
    result = JobResult(status="succeeded", metrics=metrics, tokens_seen=callback.tokens_seen(state),
                       flops_used=callback.flops_used(state), steps=state.global_step)
    if callback.cancelled:
        result.status = "cancelled"
        return result
    if callback.cap_reached is not None:
        result.status, result.error = "failed", callback.cap_reached.to_error()
        return result

    metrics["eval_loss_after"] = _evaluate(trainer, eval_records)
    peak_flops = hardware.measure_matmul_peak_flops(device)
    metrics["mfu"] = 6.0 * parameters * metrics["tokens_per_second"] / peak_flops
    model_dir, merged_dir = _save_model(spec, trainer, tokenizer)
    result.model_dir, result.merged_dir = str(model_dir), str(merged_dir) if merged_dir else None
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir,
                   merged_dir=result.merged_dir)
    return result


def _load_model(spec: JobSpec, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # The frozen base of a LoRA run needs no fp32 master copy; trained weights keep one (see above).
    dtype = hardware.training_dtype(device) if spec.adapter == "lora" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
        model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=dtype)
    except (OSError, ValueError) as error:
        where = "" if Path(spec.base_model).is_dir() else " (no such directory; as a hub id it failed too)"
        raise JobError("invalid_model", f"cannot load the base model {spec.base_model}{where}: {error}",
                       param="base_model") from error
    return model, tokenizer


def _load_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase
               ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(format, training records, held-out records), all files in one format."""
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
    if data_format == "messages" and not tokenizer.chat_template:
        raise JobError("invalid_model", (
            "chat (messages) records need a chat template, and the base model's tokenizer has none; "
            "use a base model with one, or convert the records to prompt_completion"), param="base_model")

    fraction = spec.hyperparameters.eval_fraction
    held_out = min(MAX_EVAL_RECORDS, max(1, round(len(records) * fraction))) if fraction > 0 else 0
    if held_out >= len(records):
        held_out = 0  # too few records to hold any out: train on all, report no held-out loss
    order = list(range(len(records)))
    random.Random(spec.hyperparameters.seed).shuffle(order)
    eval_records = [records[i] for i in order[:held_out]]
    train_records = [records[i] for i in sorted(order[held_out:])]
    return data_format, train_records, eval_records


def _build_trainer(spec: JobSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   data_format: str, train_records: list[dict[str, Any]], eval_records: list[dict[str, Any]],
                   callback: JobCallback, device: str) -> SFTTrainer:
    hyper = spec.hyperparameters
    # A study's trial asks for the held-out loss every `eval_steps` too, so its pruner can stop it early.
    eval_steps = spec.options.get("eval_steps") if eval_records else None
    config = SFTConfig(
        output_dir=spec.output_dir,
        max_steps=hyper.max_steps,
        learning_rate=hyper.learning_rate,
        lr_scheduler_type=hyper.lr_scheduler,
        warmup_steps=hyper.warmup_ratio,  # a float below 1 is a ratio of max_steps in transformers 5
        weight_decay=hyper.weight_decay,
        per_device_train_batch_size=hyper.per_device_batch_size,
        per_device_eval_batch_size=2 * hyper.per_device_batch_size,  # no activations kept for backward
        gradient_accumulation_steps=hyper.gradient_accumulation_steps,
        max_length=hyper.max_seq_length,
        packing=hyper.packing,
        assistant_only_loss=data_format == "messages" and has_generation_markers(tokenizer.chat_template),
        seed=hyper.seed,
        bf16=hardware.use_bf16(device),
        activation_checkpointing=False,
        logging_steps=hyper.logging_steps,
        save_strategy="steps",
        save_steps=hyper.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        eval_strategy="steps" if eval_steps else "no",  # and before and after training, by `run`
        eval_steps=eval_steps,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=device == "cuda",
        report_to="none",
        disable_tqdm=True,
        push_to_hub=False,
    )
    peft_config = None
    if spec.adapter == "lora":
        peft_config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, processing_class=tokenizer, peft_config=peft_config, callbacks=[callback],
        train_dataset=datasets.Dataset.from_list(train_records),
        eval_dataset=datasets.Dataset.from_list(eval_records) if eval_records else None)
    # With tqdm off, Trainer prints every log dict to stdout; the events file already carries them.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _evaluate(trainer: SFTTrainer, eval_records: list[dict[str, Any]]) -> float | None:
    return trainer.evaluate()["eval_loss"] if eval_records else None


def _save_model(spec: JobSpec, trainer: SFTTrainer, tokenizer: PreTrainedTokenizerBase
                ) -> tuple[Path, Path | None]:
    """The final model in `output_dir/model` (the adapter, with LoRA) and the merged copy if asked for."""
    model_dir = Path(spec.output_dir) / "model"
    trainer.save_model(str(model_dir))  # weights or adapter, config, tokenizer and chat template
    if not (spec.adapter == "lora" and spec.merge_adapter):
        return model_dir, None
    merged_dir = Path(spec.output_dir) / "merged"
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel)
    merged = peft_model.merge_and_unload()
    # A bf16 base (LoRA on a GPU) is merged in bf16; saved as such, it loads like the base did.
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    return model_dir, merged_dir


def _newest_checkpoint(output_dir: Path) -> Path | None:
    """The complete `checkpoint-N` with the highest N, or None: a half-written one is passed over."""
    if not output_dir.is_dir():
        return None
    complete = [path for path in output_dir.iterdir()
                if _CHECKPOINT.match(path.name) and (path / _TRAINER_STATE).exists()]
    return max(complete, key=_step_of, default=None)


def _step_of(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    assert match is not None
    return int(match.group(1))
