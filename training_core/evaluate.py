"""Evaluate one or two models on an eval suite: generate, score every item, write per-item results.

    python -m training_core SPEC.json        # a JobSpec with "method": "eval"

`spec.options` carries the suite definition (`suite`, see `training_core.suite`), the items' file
(`spec.train_files[0]`, a dataset snapshot) and the models to run (`models`: the candidate and,
when the baseline has no report on this suite yet, the baseline), each `{role, ref, path,
base_path}`, where `base_path` is set for a LoRA adapter, loaded with PEFT on its base.

Read top to bottom: `run` reads the items, then per model loads it, generates greedily in batches
(left padding, the suite's stated decoding settings), computes the per-item perplexity of the
reference when a KPI asks for it, scores every KPI on every item, and writes
`output_dir/results-{role}.jsonl` (one line an item: prompt, reference, output, scores, cluster).
The result's metrics carry each model's KPI aggregates and results file; the regression gate is
computed by the service, which holds the baseline's stored report.

Compute is counted as 2 x parameters x tokens processed (prompt and generated; perplexity
passes add prompt and reference), and the job stops at its cap or a cancel between batches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training_core import data, gate, hardware, suite
from training_core.events import EventWriter
from training_core.sandboxed import SandboxedFunctions, SandboxError, SandboxLimits, reward_scores
from training_core.spec import CANCEL_FILE, JobError, JobResult, JobSpec

PREVIEW_CHARS = 2000
"""Outputs, prompts and references are stored up to this length per item."""


class _Stop(Exception):
    """The run must end early (cancel or cap); carries the result to return."""

    def __init__(self, result: JobResult):
        self.result = result


def run(spec: JobSpec, events: EventWriter, started: float | None = None) -> JobResult:
    started = time.monotonic() if started is None else started
    transformers.utils.logging.disable_progress_bar()
    definition = suite.SuiteDefinition.model_validate(spec.options["suite"])
    items = _load_items(spec, definition)
    device = hardware.pick_device()
    meter = _Meter(spec, events, started, total_batches=len(spec.options["models"]) * math.ceil(
        len(items) / definition.decoding.batch_size))
    events.message(f"evaluating {len(spec.options['models'])} model(s) on {len(items)} items",
                   items=len(items), decoding=definition.decoding.model_dump())
    runs: dict[str, Any] = {}
    try:
        for entry in spec.options["models"]:
            model, tokenizer = _load_model(entry, device)
            outputs, perplexities = _generate_all(model, tokenizer, items, definition, meter, device)
            scores = _score(definition, items, outputs, perplexities)
            path = Path(spec.output_dir) / f"results-{entry['role']}.jsonl"
            _write_results(path, items, outputs, scores)
            values = _aggregates(definition, scores)
            runs[entry["role"]] = {"ref": entry["ref"], "results_path": str(path), "items": len(items),
                                   "kpis": values, "composite": suite.composite_value(definition, values)}
            events.message(f"{entry['role']} {entry['ref']}: {runs[entry['role']]['kpis']}", role=entry["role"])
            del model
    except _Stop as stop:
        return stop.result
    metrics = {"runs": runs, "decoding": definition.decoding.model_dump(), "items": len(items),
               "eval_seconds": time.monotonic() - started}
    return JobResult(status="succeeded", metrics=metrics, tokens_seen=meter.tokens, flops_used=meter.flops,
                     steps=meter.batches)


def _load_items(spec: JobSpec, definition: suite.SuiteDefinition) -> list[dict[str, Any]]:
    path = Path(spec.train_files[0])
    records = [record for _, record in data.read_records(path) if isinstance(record, dict)]
    items = suite.items_from_records(records, definition.cluster_key)
    if not items:
        raise JobError("invalid_dataset", f"{path.name} holds no items with a reference", param="suite.dataset")
    return items[: definition.max_items] if definition.max_items else items


def _load_model(entry: dict[str, Any], device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path, base = entry["path"], entry.get("base_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path if Path(path, "tokenizer_config.json").exists() else base)
        model = AutoModelForCausalLM.from_pretrained(base or path, dtype=torch.float32)
        if base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
    except (OSError, ValueError) as error:
        raise JobError("invalid_model", f"cannot load {entry['ref']}: {error}", param="model") from error
    tokenizer.padding_side = "left"  # batched generation continues every prompt right where it ends
    tokenizer.truncation_side = "left"  # a prompt over max_prompt_tokens keeps its end, next to the answer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if not tokenizer.chat_template:
        raise JobError("invalid_model", "chat items need a tokenizer with a chat template", param="model")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def _generate_all(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[dict[str, Any]],
                  definition: suite.SuiteDefinition, meter: _Meter, device: str
                  ) -> tuple[list[str], list[float] | None]:
    decoding = definition.decoding
    wants_perplexity = any(kpi.grader["type"] == "perplexity" for kpi in definition.kpis)
    outputs: list[str] = []
    perplexities: list[float] | None = [] if wants_perplexity else None
    parameters = model.num_parameters()
    for start in range(0, len(items), decoding.batch_size):
        batch = items[start:start + decoding.batch_size]
        prompts = [_prompt_text(tokenizer, item["prompt"]) for item in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                            max_length=decoding.max_prompt_tokens, add_special_tokens=False).to(device)
        generated = model.generate(**encoded, max_new_tokens=decoding.max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        processed = int(encoded["attention_mask"].sum()) + int((new_tokens != tokenizer.pad_token_id).sum())
        if perplexities is not None:
            references = [item["reference"] for item in batch]
            ends = [_answer_end(tokenizer, item["prompt"], item["reference"]) for item in batch]
            batch_ppl, scored = _perplexity(model, tokenizer, prompts, references, ends,
                                            decoding.max_prompt_tokens, device)
            perplexities += batch_ppl
            processed += scored
        meter.step(processed, parameters)
    return outputs, perplexities


def _answer_end(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], reference: str) -> int:
    """The token that ends an answer, as fine-tuning teaches it: after a chat prompt the chat
    template's end of turn (ChatML's <|im_end|>: SFT trains a model to emit it, and never the
    end-of-text token there, so scoring end of text would count fine-tuning as a loss), after a
    plain prompt end of text."""
    if isinstance(prompt, str):
        return tokenizer.eos_token_id
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reference}], tokenize=False)
    tail = whole[len(head) + len(reference):] if whole.startswith(head + reference) else ""
    special = set(tokenizer.all_special_ids)
    return next((i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special),
                tokenizer.eos_token_id)


def _perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                references: list[str], ends: list[int], max_prompt_tokens: int,
                device: str) -> tuple[list[float], int]:
    """exp(mean NLL) of each reference's tokens and its end token after its prompt, and the tokens
    processed."""
    values, processed = [], 0
    for prompt, reference, end in zip(prompts, references, ends, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        reference_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [end]
        ids = prompt_ids + reference_ids
        start = max(len(prompt_ids), 1)  # without a prompt the first token has nothing to predict it
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, start - 1:-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[start:], device=device))
        values.append(float(torch.exp(nll)))
        processed += len(ids)
    return values, processed


def _score(definition: suite.SuiteDefinition, items: list[dict[str, Any]], outputs: list[str],
           perplexities: list[float] | None) -> dict[str, list[float]]:
    """Per KPI, one score per item."""
    scores: dict[str, list[float]] = {}
    for kpi in definition.kpis:
        grader = suite.parse_grader(kpi.grader)
        if isinstance(grader, suite.Perplexity):
            assert perplexities is not None
            scores[kpi.name] = perplexities
        elif isinstance(grader, suite.Python):
            scores[kpi.name] = _python_scores(kpi.name, grader, items, outputs)
        else:
            try:
                scores[kpi.name] = [grader.score(output, item["reference"])
                                    for item, output in zip(items, outputs, strict=True)]
            except ValueError as error:
                raise JobError("invalid_suite", f"KPI {kpi.name}: {error}", param=f"kpis.{kpi.name}") from error
    return scores


def _python_scores(name: str, grader: suite.Python, items: list[dict[str, Any]], outputs: list[str]) -> list[float]:
    prompts = [item["prompt"] if isinstance(item["prompt"], str) else item["prompt"][-1]["content"]
               for item in items]
    try:
        with SandboxedFunctions(grader.code, [grader.function], limits=SandboxLimits(cpu_seconds=60),
                                call_timeout=30.0) as sandbox:
            result = sandbox.call(grader.function, outputs=outputs, references=[i["reference"] for i in items],
                                  prompts=prompts)
        values = reward_scores(result, len(items), grader.function)
    except SandboxError as error:
        raise JobError("invalid_suite", f"KPI {name}: {error}", param=f"kpis.{name}") from error
    if any(value is None for value in values):
        raise JobError("invalid_suite", f"KPI {name}: {grader.function} returned None for an item; "
                       "return a number for every item", param=f"kpis.{name}")
    return [float(value) for value in values if value is not None]


def _aggregates(definition: suite.SuiteDefinition, scores: dict[str, list[float]]) -> dict[str, float]:
    return {kpi.name: float(gate.AGGREGATIONS[kpi.aggregation](np.asarray(scores[kpi.name])))
            for kpi in definition.kpis}


def _write_results(path: Path, items: list[dict[str, Any]], outputs: list[str],
                   scores: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for position, (item, output) in enumerate(zip(items, outputs, strict=True)):
            prompt = item["prompt"] if isinstance(item["prompt"], str) else json.dumps(item["prompt"])
            handle.write(json.dumps({
                "index": item["index"], "prompt": prompt[-PREVIEW_CHARS:],
                "reference": item["reference"][:PREVIEW_CHARS],
                "output": output[:PREVIEW_CHARS], "cluster": item["cluster"], "metadata": item["metadata"],
                "scores": {name: values[position] for name, values in scores.items()}}) + "\n")


class _Meter:
    """Counts tokens and compute per batch, reports progress, and stops at a cap or a cancel."""

    def __init__(self, spec: JobSpec, events: EventWriter, started: float, total_batches: int):
        self.spec, self.events, self.started, self.total = spec, events, started, total_batches
        self.tokens, self.flops, self.batches = 0, 0.0, 0

    def step(self, tokens: int, parameters: int) -> None:
        self.tokens += tokens
        self.flops += 2.0 * parameters * tokens
        self.batches += 1
        elapsed = time.monotonic() - self.started
        # A killed eval job starts over (resumed_from 0): its batches count from nothing again.
        self.events.metrics({"step": self.batches, "resumed_from": 0, "max_steps": self.total,
                             "tokens_seen": self.tokens, "flops_used": self.flops,
                             "tokens_per_second": self.tokens / max(elapsed, 1e-9)})
        usage = {"tokens_seen": self.tokens, "flops_used": self.flops, "steps": self.batches}
        if Path(self.spec.run_dir, CANCEL_FILE).exists():
            raise _Stop(JobResult(status="cancelled", **usage))
        limits = self.spec.limits
        over = (limits.max_flops is not None and self.flops > limits.max_flops) or (
            limits.max_seconds is not None and elapsed > limits.max_seconds)
        if over:
            error = JobError("compute_cap_reached", f"stopped after {self.batches} of {self.total} batches at the "
                             "job's compute or time cap; evaluate fewer items (max_items) or raise the cap")
            raise _Stop(JobResult(status="failed", error=error.to_error(), **usage))
