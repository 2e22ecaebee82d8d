"""Each throughput lever weighed alone: the plain TRL script with one lever added, side by side.

    .venv/bin/python benchmarks/sft_levers.py [--steps 30] [--repeats 3] [--threads 1] [--levers a,b,...]

Same model (preset `small`, tokenizer trained on the sample corpus), data (the sample support chats),
steps and batch as `sft_throughput.py`. Every lever runs `plain_trl_sft.py` with flags; the runs
alternate, so a change in the machine's load hits them alike; each figure is the median over the
repeats. Prints tokens/s and tokens per CPU-second (what an idle machine would do: the figure a
shared machine's load disturbs least), their ratios to the plain fp32 script, and the mean and final
training loss (the mean of the last five steps), whose change says whether the lever changes what
is learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_core import presets

SAMPLE = ROOT / "examples" / "sample_corpus"
LEVERS: dict[str, list[str]] = {
    "plain fp32 (baseline)": [],
    "bf16 autocast": ["--bf16"],
    "bf16 + fp32 attention": ["--bf16", "--attention", "packed_sdpa"],
    "fp32 + padding-free (packed_sdpa)": ["--padding-free", "--attention", "packed_sdpa"],
    "bf16 + padding-free (sdpa mask)": ["--bf16", "--padding-free"],
    "bf16 + padding-free (packed_sdpa)": ["--bf16", "--padding-free", "--attention", "packed_sdpa"],
    "bf16 + packing (packed_sdpa)": ["--bf16", "--packing", "--attention", "packed_sdpa"],
    "bf16 + fp32 attn + group_by_length": ["--bf16", "--group-by-length", "--attention", "packed_sdpa"],
    "job levers + foreach AdamW": ["--bf16", "--padding-free", "--attention", "packed_sdpa", "--optim", "adamw_torch"],
    "job levers + grad checkpointing": ["--bf16", "--padding-free", "--attention", "packed_sdpa",
                                         "--gradient-checkpointing"],
    "job levers + torch.compile": ["--bf16", "--padding-free", "--attention", "packed_sdpa", "--compile"],
}


def run(model_dir: Path, steps: int, batch: int, seq_len: int, flags: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_trl_sft.py"), str(model_dir),
                          str(SAMPLE / "support_chat.jsonl"), str(steps), str(batch), str(seq_len), *flags],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levers", default=",".join(name for name in LEVERS if "compile" not in name),
                        help=f"comma-separated, from: {', '.join(LEVERS)}")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                      PYTHONPATH=str(ROOT))
    chosen = [name.strip() for name in args.levers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLE.glob("*.txt"))]
        model_dir = presets.build_base_model("small", texts, Path(tmp) / "small")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
        for _ in range(args.repeats):
            for name in chosen:
                results[name].append(run(model_dir, args.steps, args.batch, args.seq_len, LEVERS[name]))
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "precision"}
              for name, runs in results.items()}
    base = median[chosen[0]]
    print(f"{args.steps} steps x batch {args.batch} x seq {args.seq_len}; {args.threads} thread(s); "
          f"median of {args.repeats} alternating runs; ratios against '{chosen[0]}'")
    print(f"{'lever':36}{'tokens/s':>10}{'ratio':>7}{'tok/CPU-s':>11}{'ratio':>7}{'train loss':>12}"
          f"{'final loss':>12}")
    for name, figures in median.items():
        wall, cpu = figures["tokens_per_second"], figures["tokens_per_cpu_second"]
        print(f"{name:36}{wall:10,.0f}{wall / base['tokens_per_second']:7.2f}{cpu:11,.0f}"
              f"{cpu / base['tokens_per_cpu_second']:7.2f}{figures['train_loss']:12.4f}{figures['final_loss']:12.4f}")


if __name__ == "__main__":
    main()
