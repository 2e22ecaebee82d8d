"""Synthetic data throughput: the template generator's records/s, and the model generator against a
plain batched `generate` loop, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synth_throughput.py [--records 2000] [--prompts 64] [--batch 16]
        [--new-tokens 32]

(On a CPU shared with other work, set the threads as the executor sets a job's: torch threads that
outnumber the free cores stall each other, ten times over on a busy two-core machine.)

Template: `training_core.synthetic.run` (what a synth job's child runs) makes `--records`
instruction records from two templates and five slots, through the default filters (exact and
near-duplicates by word 3-gram Jaccard, 13-gram decontamination against 50 planted items), without and with the
ROUGE-L diversity filter (which compares each record with every kept one, so it is measured on a
tenth of the records). The job's process start and registration are not in the figure.

Model: the same ~10M-parameter Llama-style model (preset `small`, tokenizer trained on the sample
corpus), the same `--prompts` chat prompts, the same batch size and `--new-tokens`, greedy, on
this machine's device. `LocalModel.complete` (the generator a synth job uses) against a loop that
tokenizes with left padding and calls `model.generate` batch by batch. Tokens/s counts generated
tokens up to the end of sequence, for both. Three alternating rounds after a warm-up; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_core import presets
from training_core.events import EventWriter
from training_core.spec import Hyperparameters, JobSpec, Limits
from training_core.synthetic import run as run_synth
from training_core.synthetic.generators import LocalModel

SAMPLE = ROOT / "examples" / "sample_corpus"
TEMPLATES = [
    {"prompt": "How do I {verb} the {thing} at {site}?",
     "completion": "To {verb} the {thing} at {site}, open its {place} entry, check the light level, and "
                   "follow the {thing} checklist; {closing}."},
    {"messages": [{"role": "user", "content": "Ticket {ticket}: the {thing} at {site} needs a {verb}. Who takes it?"},
                  {"role": "assistant", "content": "The {team} takes ticket {ticket}: they {verb} the {thing} at "
                   "{site} and note it in the {place}; {closing}."}]},
]
SLOTS = {
    "verb": ["reset", "inspect", "replace", "label", "test", "reseat", "clean", "document"],
    "thing": ["ONT", "splice cabinet", "router", "drop cable", "patch panel", "splitter", "fibre tray"],
    "site": [f"site {n}" for n in range(1, 60)],
    "place": ["Gridbook", "field portal", "cabinet register"],
    "ticket": [f"T{n}" for n in range(100, 400)],
    "team": ["field team", "night desk", "T2 group", "network office"],
    "closing": ["then close the ticket", "then call the customer", "then park the ticket", "then hand it back"],
}


def template_records_per_second(records: int, diversity: float | None) -> dict[str, Any]:
    options = {
        "task": "instructions", "num_records": records, "max_generated": 2 * records, "seed": 0, "batch_size": 32,
        "generator": {"type": "template", "describe": "template", "templates": TEMPLATES, "slots": SLOTS},
        "rejected_generator": None,
        "task_options": {"output_format": "messages", "seeds_per_prompt": 3, "chunk_chars": 1000, "tools": [],
                         "chosen": "generator", "rejected": "corruption", "rejected_model": None,
                         "system_prompt": None},
        "filters": {"near_duplicate": 0.8, "diversity_rouge_l": diversity, "min_chars": 1, "max_chars": 20_000,
                    "score": None},
        "seed_examples": [], "sources": [], "decontaminate": [],
        "decontaminate_texts": [f"planted evaluation item number {n} about the splice cabinet at a site far away "
                                "from the office" for n in range(50)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec = JobSpec(job_id="bench", method="synth", run_dir=tmp, output_dir=f"{tmp}/out", base_model="",
                       train_files=[], hyperparameters=Hyperparameters(0.0, 2 * records, 32, 1, 0),
                       limits=Limits(), options=options)
        with EventWriter(tmp) as events:
            started = time.perf_counter()
            result = run_synth(spec, events, time.monotonic())
            seconds = time.perf_counter() - started
    return {"records": result.metrics["records"], "generated": result.metrics["generated"], "seconds": seconds,
            "records_per_second": result.metrics["records"] / seconds}


def plain_loop(model: Any, tokenizer: Any, texts: list[str], batch: int, new_tokens: int) -> tuple[int, float]:
    import torch

    tokens = 0
    sync()
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        inputs = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
            tokens += ends[0] if ends else len(row)
    sync()
    return tokens, time.perf_counter() - started


def ours(generator: LocalModel, conversations: list[list[dict[str, str]]]) -> tuple[int, float]:
    before = generator.tokens_generated
    sync()
    started = time.perf_counter()
    generator.complete(conversations)
    sync()
    return generator.tokens_generated - before, time.perf_counter() - started


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    plain_template = template_records_per_second(args.records, None)
    diverse = template_records_per_second(max(50, args.records // 10), 0.7)
    print(f"template generator: {plain_template['records']} records in {plain_template['seconds']:.2f} s = "
          f"{plain_template['records_per_second']:.0f} records/s ({plain_template['generated']} generated; "
          "exact + near-duplicate + decontamination filters)")
    print(f"template generator with the ROUGE-L diversity filter: {diverse['records']} records in "
          f"{diverse['seconds']:.2f} s = {diverse['records_per_second']:.0f} records/s")

    with tempfile.TemporaryDirectory() as tmp:
        texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
        model_dir = Path(tmp) / "small"
        presets.build_base_model("small", texts, model_dir)
        generator = LocalModel(str(model_dir), max_new_tokens=args.new_tokens, temperature=0.0,
                               batch_size=args.batch)
        questions = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 20]
        conversations = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(args.prompts)]
        prompt_texts = [generator.prompt_text(c) for c in conversations]
        ours(generator, conversations[: args.batch])  # warm-up: allocator, kernels
        plain_loop(generator.model, generator.tokenizer, prompt_texts[: args.batch], args.batch, args.new_tokens)
        plain_rates, our_rates = [], []
        for _ in range(3):
            tokens, seconds = plain_loop(generator.model, generator.tokenizer, prompt_texts, args.batch,
                                         args.new_tokens)
            plain_rates.append(tokens / seconds)
            tokens, seconds = ours(generator, conversations)
            our_rates.append(tokens / seconds)
    plain_rate, our_rate = statistics.median(plain_rates), statistics.median(our_rates)
    print(f"model generator ({generator.parameters:,} params, {generator.device}, batch {args.batch}, "
          f"{args.prompts} prompts, {args.new_tokens} new tokens): synth {our_rate:.0f} tokens/s, plain generate "
          f"loop {plain_rate:.0f} tokens/s, ratio {our_rate / plain_rate:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
