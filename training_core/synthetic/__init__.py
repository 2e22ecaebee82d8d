"""A synth job: generate records for a task, filter them, write the dataset and its manifest.

    python -m training_core SPEC.json      (spec.method == "synth"; settings in spec.options)

`run` reads the sources (seed examples, document chunks, decontamination texts), then generates
in rounds until it has kept `num_records` or reaches a cap: `max_generated` records tried, the
generated-token cap (`limits.max_tokens`), the compute cap (`limits.max_flops`, 2 x parameters
per generated token for a local model), or the wall-clock cap. A job stopped by a cap still
writes what it kept, marked `partial` with the reason. Each round's records pass the filters
(`filters.py`) and, when asked, a score from a judge model or a sandboxed Python function.

It leaves in `output_dir`:
- `dataset.jsonl`: the kept records, each with its `metadata` (task, generator, seed, index, ...).
  A record made from a document chunk names it by reference, never by its text (a chunk may hold
  eval-suite sentences that decontamination removed from the records themselves):
  `source_chunk: {dataset_id, dataset_hash, index, start, end, sha256}`, where `start`:`end` are
  character offsets into the source's document text (`read_source`) and `sha256` is the chunk's.
- `manifest.json`: task, generator (never a key), seed, templates or prompts, sources by content
  hash, filter settings and drop counts: the dataset's lineage, which the service registers.
  `decontaminated_against` lists what the records were checked against, each by id and hash:
  `{"kind": "dataset", dataset_id, content_hash, records}` and `{"kind": "eval_suite", suite_id,
  name, content_hash, dataset_id, dataset_hash, items}` (from the spec's `decontaminate` and
  `decontaminate_suites`; bare `decontaminate_texts` can only be counted: `{"kind": "eval_items",
  items}`).

Same request, same dataset: the template generator draws everything from `random.Random(seed)`,
and a local model decodes greedily unless a temperature is given. A run that is killed starts
over on resume (generation is cheap next to training, and starting over keeps it deterministic).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any

from training_core import data
from training_core.data_files import read_records
from training_core.events import EventWriter
from training_core.spec import CANCEL_FILE, JobError, JobResult, JobSpec, write_json_atomic
from training_core.synthetic import generators, tasks
from training_core.synthetic.filters import FILTERS, RecordFilters, record_text

DATASET_FILE = "dataset.jsonl"
MANIFEST_FILE = "manifest.json"
JUDGE_PROMPT = ("Rate this training example for correctness and usefulness from 1 (useless) to 10 "
                "(excellent). Reply with the number only.\n\n{example}")


def run(spec: JobSpec, events: EventWriter, started: float) -> JobResult:
    options = spec.options
    task = options["task"]
    sources = _load_sources(options)
    generator = rejecter = judge = None
    if options["generator"]["type"] != "template":
        generator = generators.build(options["generator"])
    if options.get("rejected_generator"):
        rejecter = generators.build(options["rejected_generator"])
    score = options["filters"].get("score")
    if score and score.get("judge"):
        judge = generators.build(score["judge"])
    used = [g for g in (generator, rejecter, judge) if g is not None]
    contamination, decontaminated_against = _contamination(options)
    filters = RecordFilters(options["filters"], options["task_options"]["tools"] if task == "workflow_traces" else None,
                            contamination)
    events.message(f"synth {task}: {options['num_records']} records with {options['generator']['describe']}",
                   sources=len(options["sources"]), seeds=len(sources.seeds), chunks=len(sources.chunks))

    rng = random.Random(options["seed"])
    kept: list[dict[str, Any]] = []
    generated, stop_reason = 0, None
    per_record_tokens = (max(1, tasks.calls_per_record(task, options))
                         * int(options["generator"].get("max_new_tokens") or 0))
    while len(kept) < options["num_records"]:
        tokens = sum(g.tokens_generated for g in used)
        flops = sum(g.flops_used for g in used)
        stop_reason, room = _cap(spec, options, started, generated, tokens, flops, per_record_tokens)
        if stop_reason is not None:
            break
        if (Path(spec.run_dir) / CANCEL_FILE).exists():
            return JobResult(status="cancelled", error={"code": "cancelled", "message": "cancelled", "param": None},
                             tokens_seen=tokens, flops_used=flops, steps=generated)
        n = min(options["batch_size"], options["num_records"] - len(kept), room)
        if generator is None:
            batch = tasks.from_templates(task, rng, sources, options, generated, n)
        else:
            batch = tasks.with_generator(task, rng, sources, options, generator, rejecter, generated, n)
        kept += _filtered(batch.records, filters, score, judge, generated)
        generated += n
        # A killed synth job starts over: its steps count from nothing again.
        events.metrics({"step": generated, "resumed_from": 0, "max_steps": options["max_generated"],
                        "records_kept": len(kept),
                        "tokens_seen": sum(g.tokens_generated for g in used),
                        "flops_used": sum(g.flops_used for g in used),
                        "tokens_per_second": sum(g.tokens_generated for g in used)
                        / max(time.monotonic() - started, 1e-9)})

    tokens, flops = sum(g.tokens_generated for g in used), sum(g.flops_used for g in used)
    dropped = {name: filters.dropped.get(name, 0) for name in FILTERS}
    if not kept:
        raise JobError("no_records", f"all {generated} generated records were dropped (by filter: "
                       f"{json.dumps({k: v for k, v in dropped.items() if v})}); loosen the filters, add seeds or "
                       "templates, or try another generator", param="filters")
    kept = kept[: options["num_records"]]
    partial = len(kept) < options["num_records"]
    _write_outputs(spec, options, kept, dropped, generated, partial, stop_reason, tokens, decontaminated_against)
    metrics: dict[str, Any] = {"records": len(kept), "generated": generated, "partial": partial,
                               "stop_reason": stop_reason, "tokens_generated": tokens,
                               **{f"dropped_{k}": v for k, v in dropped.items()}}
    if isinstance(generator, generators.Endpoint):
        metrics["endpoint_retries"] = generator.retries
    events.message(f"kept {len(kept)} of {generated} generated records"
                   + (f"; partial: {stop_reason}" if partial else ""), **metrics)
    return JobResult(status="succeeded", metrics=metrics, tokens_seen=tokens, flops_used=flops, steps=generated)


def _cap(spec: JobSpec, options: dict[str, Any], started: float, generated: int, tokens: int, flops: float,
         per_record_tokens: int) -> tuple[str | None, int]:
    """The cap that stops generation now, if any, and how many more records fit under the caps."""
    room = options["max_generated"] - generated
    if room <= 0:
        return "max_generated", 0
    limits = spec.limits
    if limits.max_seconds is not None and time.monotonic() - started >= limits.max_seconds:
        return "max_seconds", 0
    if limits.max_flops is not None and flops >= limits.max_flops:
        return "max_flops", 0
    if limits.max_tokens is not None and per_record_tokens:
        # Never start a record whose worst case would pass the token cap.
        room = min(room, (limits.max_tokens - tokens) // per_record_tokens)
        if room <= 0:
            return "max_tokens", 0
    return None, room


def _filtered(records: list[dict[str, Any] | None], filters: RecordFilters, score: dict[str, Any] | None,
              judge: generators.TextGenerator | None, first_index: int) -> list[dict[str, Any]]:
    """The batch's records that pass every filter, in order; the score runs only on what passed the rest."""
    scores: dict[int, float | None] = {}
    if score:
        candidates = [r for r in records if r is not None and filters.why_dropped(r) is None]
        scores = dict(zip(map(id, candidates), _scores(candidates, score, judge), strict=True))
    kept = []
    for offset, record in enumerate(records):
        if record is None:
            filters.dropped["format"] += 1
            continue
        if id(record) in scores:
            value = scores[id(record)]
            record["metadata"]["scores"] = {"score": value}
            if value is None or value < score["threshold"]:  # type: ignore[index]
                filters.dropped["score"] += 1
                continue
        if filters.admit(record, first_index + offset):
            kept.append(record)
    return kept


def _scores(records: list[dict[str, Any]], score: dict[str, Any], judge: generators.TextGenerator | None
            ) -> list[float | None]:
    if not records:
        return []
    if judge is not None:
        outputs = judge.complete([[{"role": "user", "content": JUDGE_PROMPT.format(example=record_text(r))}]
                                  for r in records])
        return [_rating(o.text) for o in outputs]
    from training_core.sandboxed import SandboxedFunctions, SandboxError, reward_scores

    name = score["function"]
    try:
        with SandboxedFunctions(score["python"], [name], call_timeout=30.0) as sandbox:
            bare = [{k: v for k, v in r.items() if k != "metadata"} for r in records]
            return reward_scores(sandbox.call(name, records=bare), len(records), name)
    except SandboxError as error:
        raise JobError("score_function_failed", str(error), param="filters.score.python") from error


def _rating(text: str) -> float | None:
    """A judge's 1-10 rating as 0.1-1.0; None when it gave no number."""
    match = re.search(r"\d+(?:\.\d+)?", text)
    return min(10.0, float(match.group())) / 10 if match else None


def _load_sources(options: dict[str, Any]) -> tasks.Sources:
    """Seeds from the request and from source datasets that hold examples; chunks from the rest."""
    sources = tasks.Sources(seeds=list(options["seed_examples"]))
    chunk_chars = options["task_options"]["chunk_chars"]
    for source in options["sources"]:
        document, seeds = read_source(Path(source["path"]), options["task"])
        sources.seeds += seeds
        for index, (start, end) in enumerate(chunk_spans(document, chunk_chars)):
            text = document[start:end]
            sources.chunks.append({"text": text, "reference": {
                "dataset_id": source["dataset_id"], "dataset_hash": source["content_hash"], "index": index,
                "start": start, "end": end, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}})
    task, template = options["task"], options["generator"]["type"] == "template"
    if task == "qa_from_documents" and not sources.chunks:
        raise JobError("invalid_request", "the sources hold no text to ask questions about", param="sources")
    if not template and task in ("instructions", "prompts", "preferences") and not sources.seeds:
        raise JobError("invalid_request", f"{task} grows new examples from seeds, and neither seed_examples nor "
                       "the sources hold any (text datasets are documents, not examples)", param="seed_examples")
    if (not template and task == "preferences" and options["task_options"]["chosen"] == "reference"
            and not any(tasks.seed_completion(s) for s in sources.seeds)):
        raise JobError("invalid_request", 'chosen="reference" needs seeds with an answer ("completion" or an '
                       "assistant turn)", param="options.chosen")
    return sources


def read_source(path: Path, task: str) -> tuple[str, list[dict[str, Any]]]:
    """A source dataset as (its document text, its seed examples).

    The document text is the `text` of its text records (for `qa_from_documents`, the text of every
    record) joined by a blank line; a chunk's `start` and `end` are offsets into it. Other records
    are seeds.
    """
    texts, seeds = [], []
    for _, item in read_records(path):
        if not isinstance(item, dict):
            continue
        if "text" in item:
            texts.append(str(item["text"]))
        elif task == "qa_from_documents":
            texts.append(record_text(item))
        else:
            seeds.append(item)
    return "\n\n".join(texts), seeds


def chunk_spans(document: str, size: int) -> list[tuple[int, int]]:
    """(start, end) of pieces of `document` of at most `size` characters: whole paragraphs (split by
    blank lines) packed together, a longer paragraph cut at a space; no piece starts or ends with
    whitespace."""
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    offset = 0
    for part in document.split("\n\n"):
        start, end = _stripped(document, offset, offset + len(part))
        offset += len(part) + 2
        if start == end:
            continue
        if current is not None and end - current[0] > size:
            spans.append(current)
            current = None
        while end - start > size:
            cut = document.rfind(" ", start, start + size) - start
            cut = cut if cut > size // 2 else size
            spans.append(_stripped(document, start, start + cut))
            start = _stripped(document, start + cut, end)[0]
        current = (current[0] if current else start, end)
    if current is not None:
        spans.append(current)
    return spans


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _contamination(options: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The texts generated records must not overlap, and what they came from, by id and hash."""
    texts: list[str] = []
    against: list[dict[str, Any]] = []
    for source in options["decontaminate"]:
        found = [record_text(item) if "text" not in item else item["text"]
                 for _, item in read_records(Path(source["path"])) if isinstance(item, dict)]
        texts += found
        against.append({"kind": "dataset", "dataset_id": source["dataset_id"], "content_hash": source["content_hash"],
                        "records": len(found)})
    for suite in options.get("decontaminate_suites") or []:
        # An eval item is its prompt and its reference, as the suite scores it.
        found = [data.record_text(item) for _, item in read_records(Path(suite["path"])) if isinstance(item, dict)]
        texts += found
        against.append({"kind": "eval_suite", **{key: suite[key] for key in (
            "suite_id", "name", "content_hash", "dataset_id", "dataset_hash")}, "items": len(found)})
    if options.get("decontaminate_texts"):
        texts += options["decontaminate_texts"]
        against.append({"kind": "eval_items", "items": len(options["decontaminate_texts"])})
    return texts, against


def _write_outputs(spec: JobSpec, options: dict[str, Any], kept: list[dict[str, Any]], dropped: dict[str, int],
                   generated: int, partial: bool, stop_reason: str | None, tokens: int,
                   decontaminated_against: list[dict[str, Any]]) -> None:
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / DATASET_FILE).open("w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    generator = options["generator"]
    manifest = {
        "task": options["task"], "seed": options["seed"], "num_records": options["num_records"],
        "generator": {k: v for k, v in generator.items() if k not in ("model_dir", "endpoint_config", "slots",
                                                                   "templates")},
        "templates": generator.get("templates"), "slots": generator.get("slots"),
        "prompts": None if generator["type"] == "template" else tasks.PROMPTS,
        "rejected_generator": (options.get("rejected_generator") or {}).get("describe"),
        "task_options": options["task_options"], "filters": _public_filters(options["filters"]),
        "sources": [{k: s[k] for k in ("dataset_id", "content_hash")} for s in options["sources"]],
        "decontaminated_against": decontaminated_against,
        "seed_examples": len(options["seed_examples"]), "records": len(kept), "generated": generated,
        "dropped": dropped, "partial": partial, "stop_reason": stop_reason, "tokens_generated": tokens,
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)


def _public_filters(filters: dict[str, Any]) -> dict[str, Any]:
    score = filters.get("score")
    if score and score.get("judge"):
        score = {"judge": score["judge"]["describe"], "threshold": score["threshold"]}
    return {**filters, "score": score}
