"""Pre-training throughput and model FLOPs utilisation (MFU) of a size preset.

    .venv/bin/python benchmarks/pretrain_mfu.py [--preset small] [--steps 30] [--batch 8] [--seq-len 256]
    .venv/bin/python benchmarks/pretrain_mfu.py --preset 125m --batch 16 --seq-len 1024 --steps 40   # one GPU

A real `pretrain` job (tokenizer trained on the sample corpus, model from the preset, packed blocks)
run as `python -m training_core`. MFU is 6 x parameters x tokens/s over the device's measured
matmul peak in the precision the job trained in (bf16 where the device is faster with it), the
figure every job records. Targets: a ~10M preset on this CPU is reported as measured; the 125m preset on
one GPU aims at >= 40%.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from run_spec import SAMPLE, print_json, run_method

from training_core import hardware


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat-corpus", type=int, default=20, help="copies of the sample text, so blocks suffice")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus.txt"
        text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLE.glob("*.txt")))
        corpus.write_text("\n\n".join([text] * args.repeat_corpus), encoding="utf-8")
        result = run_method(work / "pretrain", "pretrain", "", [str(corpus)], {
            "learning_rate": 1e-3, "max_steps": args.steps, "per_device_batch_size": args.batch,
            "max_seq_length": args.seq_len}, options={"preset": args.preset, "vocab_size": args.vocab_size})
    device = result.metrics["device"]
    print_json({
        "preset": args.preset, "parameters": result.metrics["parameters"], "device": device,
        "batch": args.batch, "seq_len": args.seq_len, "steps": result.steps,
        "tokens_per_second": round(result.metrics["tokens_per_second"], 1),
        "precision": result.metrics["precision"],
        "matmul_peak_tflops": round(hardware.measure_matmul_peak_flops(
            device, torch.bfloat16 if result.metrics["precision"] == "bf16" else torch.float32) / 1e12, 3),
        "mfu": round(result.metrics["mfu"], 4),
        "train_loss": round(result.metrics["train_loss"], 3),
    })


if __name__ == "__main__":
    main()
