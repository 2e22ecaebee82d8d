"""Peak memory of LoRA against full fine-tuning on the same model, data and steps.

    .venv/bin/python benchmarks/lora_memory.py [--preset 125m] [--steps 4] [--shapes 1x64,4x128] [--checkpointing]

Each run is its own process (`python -m training_core`), and each figure is the peak the job
records: from the start of training (model loaded) to its end, the peak of allocated memory on a
GPU, the peak resident set on the CPU. The CPU figure includes the ~0.4 GB that torch and
transformers occupy either way, so the CPU ratio understates LoRA's gain.

LoRA saves the gradients and optimizer state of the frozen weights, and, where the device trains in
bf16 (`precision: auto`), stores the frozen base in bf16: half its fp32 size. Full fine-tuning
peaks at the optimizer step (weights, gradients, Adam's two moments), LoRA while its activations
are held for the backward pass. So the ratio is measured at two batch shapes (sequences x tokens):
one where the model's state dominates, one where activations weigh in. Target: LoRA <= 0.6x full
at 4 x 128 on the 125m preset.

`--checkpointing` adds both runs again with gradient checkpointing (activations recomputed in the
backward pass), and prints what it saves and what it costs in tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from run_spec import SAMPLE, print_json, run_method

from training_core import presets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shapes", default="1x64,4x128", help="batch x sequence length, comma-separated")
    parser.add_argument("--checkpointing", action="store_true", help="also with gradient checkpointing")
    args = parser.parse_args()
    gib = 1024**3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLE.glob("*.txt"))]
        base = presets.build_base_model(args.preset, texts, work / "base")
        data = [str(SAMPLE / "support_chat.jsonl")]
        for shape in args.shapes.split(","):
            batch, seq_len = (int(part) for part in shape.split("x"))
            hyper = {"learning_rate": 1e-4, "max_steps": args.steps, "per_device_batch_size": batch,
                     "max_seq_length": seq_len}
            runs = {(adapter, checkpointing): run_method(
                        work / f"{adapter}-{checkpointing}-{shape}", "sft", str(base), data,
                        {**hyper, "gradient_checkpointing": checkpointing}, adapter=adapter)
                    for checkpointing in ((False, True) if args.checkpointing else (False,))
                    for adapter in ("full", "lora")}
            full, lora = runs["full", False], runs["lora", False]
            peak = {key: result.metrics["peak_memory_bytes"] for key, result in runs.items()}
            figures = {
                "preset": args.preset, "parameters": full.metrics["parameters"], "device": full.metrics["device"],
                "precision": full.metrics["precision"], "batch": batch, "seq_len": seq_len,
                "trainable_parameters_lora": lora.metrics["trainable_parameters"],
                "full_peak_gib": round(peak["full", False] / gib, 3),
                "lora_peak_gib": round(peak["lora", False] / gib, 3),
                "lora_over_full": round(peak["lora", False] / peak["full", False], 3),
                "target": "<= 0.6",
            }
            if args.checkpointing:
                figures |= {
                    "full_checkpointed_peak_gib": round(peak["full", True] / gib, 3),
                    "lora_checkpointed_peak_gib": round(peak["lora", True] / gib, 3),
                    "lora_checkpointed_over_full": round(peak["lora", True] / peak["full", False], 3),
                }
                # What checkpointing costs: tokens/s, and tokens per CPU-second (the figure a shared
                # machine's load disturbs least), with it over without.
                for metric in ("tokens_per_second", "tokens_per_cpu_second"):
                    speed = {key: result.metrics[metric] for key, result in runs.items()}
                    for adapter in ("full", "lora"):
                        figures[f"checkpointing_{metric}_ratio_{adapter}"] = round(
                            speed[adapter, True] / speed[adapter, False], 3)
            print_json(figures)


if __name__ == "__main__":
    main()
