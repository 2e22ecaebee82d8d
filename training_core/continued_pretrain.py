"""Continued pre-training: next-token prediction on new text from an existing model, tokenizer kept.

    python -m training_core SPEC.json        # a JobSpec with "method": "continued_pretrain"

Read top to bottom: `run` loads the base model and its tokenizer (full weights, or a LoRA adapter
on a frozen base), holds out documents of the new text, streams the rest from a token file in
blocks like `pretrain` does (`training_core.corpus`: tokenized once per snapshot and tokenizer), and
measures held-out perplexity and bits per byte twice, before and after training: on the new
domain, and on a held-out slice of what the base model was trained on, so forgetting is visible.

That slice is the base model's own `heldout.jsonl` (written by `pretrain` and by this method), or
the text records of `spec.options["reference_files"]` when the service was given a reference
dataset. With neither, forgetting is not measured, and the job says so in its events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, default_data_collator

from training_core import corpus, data, language_modeling, runs
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.pretrain import HELDOUT_FILE, MAX_EVAL_DOCUMENTS, write_heldout
from training_core.spec import JobError, JobResult, JobSpec


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    started, device = runs.begin(started)

    model, tokenizer = runs.load_model(spec, device)
    if spec.adapter == "lora":
        model = _with_adapter(spec, model)
    snapshots = [Path(path) for path in spec.train_files]
    hyper = spec.hyperparameters
    held_out = corpus.hold_out(snapshots, hyper.eval_fraction, MAX_EVAL_DOCUMENTS, hyper.seed)
    new_texts = held_out.texts
    base_texts = _base_heldout(spec, events)
    block_size = hyper.max_seq_length
    token_files = [corpus.token_file(path, tokenizer, spec, events) for path in snapshots]
    blocks = corpus.TokenBlocks(token_files, block_size, skip=held_out.ordinals)
    events.message(f"packed {held_out.documents - len(new_texts)} new documents into {len(blocks)} blocks of "
                   f"{block_size} tokens", blocks=len(blocks), held_out=len(new_texts), base_held_out=len(base_texts))

    parameters = model.num_parameters()
    callback = JobCallback(events, spec, spec.flops_per_token or 6.0 * parameters, started, device)
    trainer = runs.quiet(Trainer(
        model=model, args=TrainingArguments(**runs.common_arguments(spec, device)), train_dataset=blocks,
        data_collator=default_data_collator, processing_class=tokenizer, callbacks=[callback]))

    def figures(when: str) -> dict[str, Any]:
        return {**language_modeling.prefixed(f"new_domain_{when}", language_modeling.heldout_figures(
                    trainer.model, tokenizer, new_texts, block_size)),
                **language_modeling.prefixed(f"base_domain_{when}", language_modeling.heldout_figures(
                    trainer.model, tokenizer, base_texts, block_size))}

    before = figures("before")
    output, _ = runs.train(trainer, spec, events)

    metrics: dict[str, Any] = {
        "train_loss": output.training_loss, "block_size": block_size, "train_blocks": len(blocks), **before,
        **runs.run_metrics(callback, trainer.state, device, parameters, model.num_parameters(only_trainable=True)),
    }
    result = runs.outcome(callback, trainer.state, metrics)
    if result.status != "succeeded":
        return result
    metrics.update(figures("after"))
    if base_texts:
        # How much worse the old domain got: the ratio of perplexities after and before (1.0: nothing lost).
        metrics["forgetting_perplexity_ratio"] = (
            metrics["base_domain_after_perplexity"] / metrics["base_domain_before_perplexity"])
    model_dir, merged_dir = runs.save_model(spec, trainer, tokenizer)
    for directory in filter(None, (model_dir, merged_dir)):
        write_heldout(directory, new_texts)
    result.model_dir, result.merged_dir = str(model_dir), str(merged_dir) if merged_dir else None
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir)
    return result


def _with_adapter(spec: JobSpec, model: Any) -> Any:
    """Plain `Trainer` takes a PEFT model as it is; the SFT/DPO/GRPO trainers wrap it themselves."""
    from peft import get_peft_model

    config = runs.lora_config(spec)
    assert config is not None
    return get_peft_model(model, config)


def _base_heldout(spec: JobSpec, events: EventWriter) -> list[str]:
    files = [Path(path) for path in spec.options.get("reference_files", [])]
    if not files and (Path(spec.base_model) / HELDOUT_FILE).exists():
        files = [Path(spec.base_model) / HELDOUT_FILE]
    texts: list[str] = []
    for path in files:
        try:
            _, records = data.load_examples(path)
        except data.DatasetError as error:
            raise JobError("invalid_dataset", f"reference text {path.name}: {error}", param="options") from error
        texts += [data.record_text(record) for record in records]
    if not texts:
        events.message("forgetting is not measured: the base model has no held-out slice of its training data "
                       "(heldout.jsonl) and no reference dataset was given", level="warning")
    return texts[:MAX_EVAL_DOCUMENTS]
