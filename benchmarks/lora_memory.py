"""Peak memory of LoRA against full fine-tuning on the same model, data and steps.

    .venv/bin/python benchmarks/lora_memory.py [--preset 125m] [--steps 4] [--batch 4] [--seq-len 128]

Each run is its own process (`python -m training_core`), so each peak is that run's alone: on a
GPU the peak of allocated memory, on the CPU the peak resident set (which includes the ~0.4 GB
that importing torch and transformers costs either way, so the CPU ratio understates LoRA's gain).
The model is a preset with a tokenizer trained on the sample corpus. Target: LoRA <= 0.6x full.
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
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLE.glob("*.txt"))]
        base = presets.build_base_model(args.preset, texts, work / "base")
        hyper = {"learning_rate": 1e-4, "max_steps": args.steps, "per_device_batch_size": args.batch,
                 "max_seq_length": args.seq_len}
        data = [str(SAMPLE / "support_chat.jsonl")]
        full = run_method(work / "full", "sft", str(base), data, hyper, adapter="full")
        lora = run_method(work / "lora", "sft", str(base), data, hyper, adapter="lora")
    gib = 1024**3
    print_json({
        "preset": args.preset, "parameters": full.metrics["parameters"], "device": full.metrics["device"],
        "trainable_parameters_lora": lora.metrics["trainable_parameters"],
        "full_peak_gib": round(full.metrics["peak_memory_bytes"] / gib, 3),
        "lora_peak_gib": round(lora.metrics["peak_memory_bytes"] / gib, 3),
        "lora_over_full": round(lora.metrics["peak_memory_bytes"] / full.metrics["peak_memory_bytes"], 3),
        "target": "<= 0.6",
    })


if __name__ == "__main__":
    main()
