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
- `padding_free` (on by default) lays a step's records one after another in a single row instead
  of padding each to the longest: the same records and loss per step, no compute on pad tokens.
- `packing` fills each sequence with several records (TRL's best-fit decreasing, padding-free).
  Each record still attends only to itself: the batch carries position ids that restart at every
  record, from which FlashAttention reads its varlen boundaries and `training_core.attention`
  attends record by record (`test_packed_records_see_only_themselves`).
- The held-out set is `eval_fraction` of the records, drawn with the job's seed, and at most
  `MAX_EVAL_RECORDS`: the evaluation before training sits between the tool call and the first
  optimizer step, so its cost must stay small whatever the dataset's size.
- Full fine-tuning keeps fp32 master weights (bf16 autocast where the device is faster with it,
  `hardware.use_bf16`); LoRA then loads the frozen base in bf16, since it needs no master copy,
  gradients or optimizer state.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from training_core import attention, hardware, runs
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.spec import JobError, JobResult, JobSpec

MAX_EVAL_RECORDS = 256
SFT_FORMATS = ("text", "prompt_completion", "messages")


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    """Fine-tune `spec.base_model` on `spec.train_files`; `started` is the process's `time.monotonic()`
    start, from which the caps and the time to the first optimizer step count."""
    started, device = runs.begin(started)

    hyper = spec.hyperparameters
    model, tokenizer = runs.load_model(spec, device, padding_free=hyper.padding_free or hyper.packing)
    data_format, train_records, eval_records = runs.load_records(spec, SFT_FORMATS, MAX_EVAL_RECORDS)
    if data_format == "messages" and not tokenizer.chat_template:
        raise JobError("invalid_model", (
            "chat (messages) records need a chat template, and the base model's tokenizer has none; "
            "use a base model with one, or convert the records to prompt_completion"), param="base_model")
    events.message(f"loaded {len(train_records)} training and {len(eval_records)} held-out "
                   f"{data_format} records", format=data_format, train_records=len(train_records),
                   eval_records=len(eval_records))
    parameters = model.num_parameters()
    flops_per_token = spec.flops_per_token or 6.0 * parameters
    callback = JobCallback(events, spec, flops_per_token, started, device)
    trainer = _build_trainer(spec, model, tokenizer, data_format, train_records, eval_records, callback,
                             device)

    eval_loss_before = _evaluate(trainer, eval_records)
    output, resumed_from = runs.train(trainer, spec, events)

    state = trainer.state
    metrics: dict[str, Any] = {
        "eval_loss_before": eval_loss_before,
        "train_loss": output.training_loss if state.global_step > resumed_from else None,
        "train_runtime_seconds": output.metrics["train_runtime"],
        # PEFT injects the adapter into this same module tree and freezes the rest.
        **runs.run_metrics(callback, state, device, parameters, model.num_parameters(only_trainable=True)),
    }
    result = runs.outcome(callback, state, metrics)
    if result.status != "succeeded":
        return result

    metrics["eval_loss_after"] = _evaluate(trainer, eval_records)
    model_dir, merged_dir = runs.save_model(spec, trainer, tokenizer)
    result.model_dir, result.merged_dir = str(model_dir), str(merged_dir) if merged_dir else None
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir,
                   merged_dir=result.merged_dir)
    return result


def _build_trainer(spec: JobSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   data_format: str, train_records: list[dict[str, Any]], eval_records: list[dict[str, Any]],
                   callback: JobCallback, device: str) -> SFTTrainer:
    hyper = spec.hyperparameters
    # A study's trial asks for the held-out loss every `eval_steps` too, so its pruner can stop it early.
    eval_steps = spec.options.get("eval_steps") if eval_records else None
    periodic = {"eval_strategy": "steps", "eval_steps": eval_steps} if eval_steps else {}
    config = SFTConfig(
        **(runs.common_arguments(spec, device) | periodic),
        max_length=hyper.max_seq_length,
        packing=hyper.packing,
        assistant_only_loss=data_format == "messages" and has_generation_markers(tokenizer.chat_template),
    )
    trainer = SFTTrainer(
        model=model, args=config, processing_class=tokenizer, peft_config=runs.lora_config(spec),
        callbacks=[callback], data_collator=_padding_free_collator(spec, tokenizer, device),
        train_dataset=datasets.Dataset.from_list(train_records),
        eval_dataset=datasets.Dataset.from_list(eval_records) if eval_records else None)
    return runs.quiet(trainer)


def _padding_free_collator(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, device: str
                           ) -> DataCollatorForLanguageModeling | None:
    """Padding-free batches of whole records (TRL's collator), or None for TRL's default: padded
    batches, or with `packing` its own padding-free packed rows.

    TRL's `padding_free` option refuses to run without packing when records are truncated to
    `max_length`, since its collator does not truncate; truncation happens earlier, when TRL
    prepares the dataset, so handing it the padding-free collator ourselves is safe."""
    hyper = spec.hyperparameters
    bf16 = hardware.use_bf16(device, hyper.precision)
    if hyper.packing or not hyper.padding_free or not attention.padding_free_supported(device, bf16):
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def _evaluate(trainer: SFTTrainer, eval_records: list[dict[str, Any]]) -> float | None:
    return trainer.evaluate()["eval_loss"] if eval_records else None
