"""Pre-training on a corpus larger than it should hold in memory: peak memory and tokenization speed.

    .venv/bin/python benchmarks/pretrain_large_corpus.py [--gigabytes 1.0] [--preset small] [--steps 5]

Generates a JSONL corpus of `--gigabytes` of text (documents of sentences drawn from a made-up
vocabulary) in a temporary directory, then runs three `pretrain` jobs (`python -m training_core`),
the same model, steps and batch each:

1. on a 4 MB corpus from the same generator: the job's memory with next to no corpus, the model's own;
2. on the large corpus: the hold-out pass, the tokenizer trained on a sample, the corpus tokenized
   into a token file beside the snapshot, blocks streamed from it;
3. on the large corpus again with another learning rate, as a tuning trial would: the token file
   is reused, not rebuilt.

Prints the tokenization throughput (MB of text and tokens a second), each job's peak resident set
before training (data and model preparation) and during it, the large job's peak beyond the small
one's (target: under 1 GB), and each job's time from start to its first optimizer step.

The resident set also counts the pages of the token file that training has read through the
memory map: page cache the kernel reclaims when it needs to, not memory the job holds, and only
the few blocks a short run touches.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from run_spec import print_json, run_method

SENTENCES = 50_000


def generate(path: Path, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Documents of 10-80 sentences from a pool of made-up ones; (documents, bytes) written."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnoprstuvwyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20_000)]
    pool = [" ".join(rng.choices(words, k=rng.randint(6, 20))).capitalize() + "." for _ in range(SENTENCES)]
    written = documents = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target_bytes:
            lines = [json.dumps({"text": " ".join(rng.choices(pool, k=rng.randint(10, 80)))}) + "\n"
                     for _ in range(1000)]
            chunk = "".join(lines)
            handle.write(chunk)
            written += len(chunk.encode("utf-8"))
            documents += len(lines)
    return documents, written


def events(work: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (work / "events.jsonl").read_text(encoding="utf-8").splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    gib = 1024**3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "small").mkdir()
        (work / "large").mkdir()
        generate(work / "small" / "corpus.jsonl", 4 * 1024**2, seed=1)
        started = time.monotonic()
        documents, written = generate(work / "large" / "corpus.jsonl", int(args.gigabytes * 1e9))
        generated_seconds = time.monotonic() - started

        def job(name: str, corpus: Path, learning_rate: float = 1e-3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            started = time.monotonic()
            result = run_method(work / name, "pretrain", "", [str(corpus)], {
                "learning_rate": learning_rate, "max_steps": args.steps, "per_device_batch_size": args.batch,
                "max_seq_length": args.seq_len, "eval_fraction": 0.0002},
                options={"preset": args.preset, "vocab_size": args.vocab_size})
            return {**result.metrics, "wall_seconds": time.monotonic() - started}, events(work / name)

        small, _ = job("job-small", work / "small" / "corpus.jsonl")
        large, large_events = job("job-large", work / "large" / "corpus.jsonl")
        again, again_events = job("job-again", work / "large" / "corpus.jsonl", learning_rate=5e-4)

    [tokenized] = [e["data"] for e in large_events if e["data"].get("reused") is False]
    [reused] = [e["data"]["reused"] for e in again_events if "reused" in e["data"]]

    def peak(metrics: dict[str, Any]) -> int:
        return max(metrics["setup_peak_memory_bytes"], metrics["peak_memory_bytes"])

    print_json({
        "corpus_gb": round(written / 1e9, 3), "documents": documents,
        "generated_in_seconds": round(generated_seconds, 1),
        "preset": args.preset, "parameters": large["parameters"], "precision": large["precision"],
        "tokens": tokenized["tokens"], "tokenize_seconds": round(tokenized["seconds"], 1),
        "tokenize_mb_per_second": round(tokenized["megabytes_per_second"], 2),
        "tokenize_tokens_per_second": round(tokenized["tokens_per_second"]),
        "small_corpus_peak_gib": {"setup": round(small["setup_peak_memory_bytes"] / gib, 3),
                                  "training": round(small["peak_memory_bytes"] / gib, 3)},
        "large_corpus_peak_gib": {"setup": round(large["setup_peak_memory_bytes"] / gib, 3),
                                  "training": round(large["peak_memory_bytes"] / gib, 3)},
        "large_beyond_small_gib": round((peak(large) - peak(small)) / gib, 3),
        "target": "< 1 GiB beyond the model",
        "time_to_first_step_seconds": {"small": round(small["time_to_first_step_seconds"], 1),
                                       "large_first_job": round(large["time_to_first_step_seconds"], 1),
                                       "large_second_job": round(again["time_to_first_step_seconds"], 1)},
        "second_job_reused_the_token_file": reused,
    })


if __name__ == "__main__":
    main()
