"""Pre-training from scratch: a tokenizer trained on the customer's corpus, a Llama model from a size
preset (or an explicit shape), next-token prediction on packed blocks with warmup and cosine decay.

    python -m training_core SPEC.json        # a JobSpec with "method": "pretrain"

`spec.options` (validated by the service before the job exists):

    preset          a name from `training_core.shapes.PRESETS` ("tiny" ~1M ... "1b" ~1B parameters)
    model_config    or an explicit shape: hidden_size, num_hidden_layers, intermediate_size,
                    num_attention_heads, num_key_value_heads, vocab_size, max_position_embeddings
    vocab_size      the tokenizer's vocabulary (default: the preset's)
    special_tokens  extra tokens never split (a domain's markers)
    chat_template   replaces the ChatML default

Read top to bottom: `run` holds out documents, trains the tokenizer (or reuses the one an earlier
job trained on the same snapshot and options) and writes the initial model to `output_dir/init`
(once: a resumed run reuses it, so its checkpoints match), tokenizes the
corpus into a token file (once per snapshot and tokenizer, `training_core.corpus`) and streams
`max_seq_length` blocks from it, measures held-out perplexity and bits per byte, trains, measures
again, and saves the model to `output_dir/model` with the held-out documents beside it
(`heldout.jsonl`), so a later `continued_pretrain` can show how much of this corpus it forgets.

The corpus is never held in memory: documents are streamed for the hold-out draw and the
tokenizer (every k-th one beyond `corpus.TOKENIZER_SAMPLE_BYTES`), and blocks are read from the
memory-mapped token file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from training_core import corpus, hardware, language_modeling, presets, runs
from training_core.callbacks import JobCallback
from training_core.events import EventWriter
from training_core.shapes import PRESETS, ModelPreset, shape_of
from training_core.spec import JobError, JobResult, JobSpec

MAX_EVAL_DOCUMENTS = 512
HELDOUT_FILE = "heldout.jsonl"
"""The held-out documents, saved beside the model: the slice `continued_pretrain` measures forgetting on."""


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    started, device = runs.begin(started)

    snapshots = [Path(path) for path in spec.train_files]
    hyper = spec.hyperparameters
    held_out = corpus.hold_out(snapshots, hyper.eval_fraction, MAX_EVAL_DOCUMENTS, hyper.seed)
    init_dir = _initial_model(spec, snapshots, held_out, events)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(
        init_dir, attn_implementation=runs.attention_implementation(spec, device))
    block_size = hyper.max_seq_length
    token_files = [corpus.token_file(path, tokenizer, spec, events) for path in snapshots]
    blocks = corpus.TokenBlocks(token_files, block_size, skip=held_out.ordinals)
    train_documents = held_out.documents - len(held_out.texts)
    events.message(f"packed {train_documents} documents into {len(blocks)} blocks of {block_size} tokens; "
                   f"{len(held_out.texts)} documents held out", blocks=len(blocks), held_out=len(held_out.texts),
                   vocab_size=len(tokenizer), parameters=model.num_parameters())

    parameters = model.num_parameters()
    callback = JobCallback(events, spec, spec.flops_per_token or 6.0 * parameters, started, device)
    trainer = runs.quiet(Trainer(
        model=model, args=TrainingArguments(**runs.common_arguments(spec, device)), train_dataset=blocks,
        data_collator=default_data_collator, processing_class=tokenizer, callbacks=[callback]))

    before = language_modeling.heldout_figures(trainer.model, tokenizer, held_out.texts, block_size)
    output, _ = runs.train(trainer, spec, events)

    metrics: dict[str, Any] = {
        "train_loss": output.training_loss, "vocab_size": len(tokenizer), "block_size": block_size,
        "train_blocks": len(blocks), **language_modeling.prefixed("heldout_before", before),
        **runs.run_metrics(callback, trainer.state, device, parameters, parameters),
    }
    result = runs.outcome(callback, trainer.state, metrics)
    if result.status != "succeeded":
        return result
    metrics.update(language_modeling.prefixed("heldout_after", language_modeling.heldout_figures(
        trainer.model, tokenizer, held_out.texts, block_size)))
    model_dir, _ = runs.save_model(spec, trainer, tokenizer)
    write_heldout(model_dir, held_out.texts)
    result.model_dir = str(model_dir)
    events.message(f"saved the model to {model_dir}", model_dir=result.model_dir,
                   perplexity=metrics.get("heldout_after_perplexity"))
    return result


def _initial_model(spec: JobSpec, snapshots: list[Path], held_out: corpus.HeldOut, events: EventWriter) -> Path:
    """Tokenizer and randomly initialised model in `output_dir/init`, built once per job; the tokenizer
    is trained on the corpus's sample once per snapshot and options (`corpus.trained_tokenizer`)."""
    init_dir = Path(spec.output_dir) / "init"
    if (init_dir / "config.json").exists():
        return init_dir
    options = spec.options
    shape = _shape(options)
    recipe: dict[str, Any] = {"vocab_size": int(options.get("vocab_size") or shape.vocab_size),
                              "model_max_length": shape.max_position_embeddings,
                              "extra_special_tokens": list(options.get("special_tokens") or []),
                              **({"chat_template": options["chat_template"]} if options.get("chat_template") else {})}
    trained = False

    def train(directory: Path) -> None:
        nonlocal trained
        texts = corpus.documents(snapshots, skip=held_out.ordinals, every=corpus.sample_stride(snapshots))
        with corpus.parallel_tokenizers():
            presets.train_tokenizer(texts, out_dir=directory, **recipe)
        trained = True

    tokenizer_dir = corpus.trained_tokenizer(snapshots, spec, recipe, held_out, train)
    # Every process of a several-device job builds the same (seeded) model; the first rename wins.
    building = init_dir.with_name(f"init.building-{os.environ.get('RANK', '0')}")
    shutil.rmtree(building, ignore_errors=True)
    presets.build_base_model(shape, tokenizer_dir, building, seed=spec.hyperparameters.seed)
    try:
        building.rename(init_dir)  # whole or absent: a run killed while building starts it again
    except OSError:  # another process's identical copy is in place
        shutil.rmtree(building, ignore_errors=True)
    how = "trained a" if trained else "reused a"
    events.message(f"{how} {len(AutoTokenizer.from_pretrained(init_dir))}-token byte-level BPE tokenizer "
                   f"and built the initial model ({options.get('preset') or 'explicit config'})",
                   tokenizer_dir=str(tokenizer_dir), tokenizer_reused=not trained)
    return init_dir


def _shape(options: dict[str, Any]) -> ModelPreset:
    name = options.get("preset", "small")
    if not options.get("model_config") and name not in PRESETS:
        raise JobError("invalid_request", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}",
                       param="options.preset")
    return shape_of(options)


def write_heldout(model_dir: Path, texts: list[str]) -> None:
    if not hardware.is_main_process():
        return
    with (model_dir / HELDOUT_FILE).open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in texts)
