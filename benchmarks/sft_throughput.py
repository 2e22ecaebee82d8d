"""SFT throughput: a `launch_training` job against the plain TRL script, side by side in one run.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 40] [--batch 8] [--seq-len 128] [--repeats 3]

Three sides on the same ~8M-parameter Llama-style model (preset `small` unless `--preset`,
tokenizer trained on the sample corpus), data (the sample support chats), steps, seed and schedule,
full fine-tuning:

- the plain TRL script as a user writes it for the device (`plain_trl_sft.py`: fp32 on a CPU, bf16
  on a GPU that has it, where the next side is the same script);
- the same script with the best precision the device offers (`--bf16`: bf16 autocast);
- the job, launched through the real MCP client (in memory) against the embedded service (SQLite,
  one local worker), with the service's defaults (precision auto, padding-free batches).

Prints tokens/s of each and tokens per CPU-second (what an idle machine would do: the figure a
shared machine's load disturbs least), the job's ratios to both scripts (targets: >= 1.5x and
>= 1.1x), MFU against this machine's measured matmul peak in the precision each side ran, the mean
and final training loss (the mean of the last five steps; the job's must stay within 2% of the
plain script's, or below), and the time from the tool call to the first optimizer step minus the
plain script's start-to-first-step. The job holds nothing out (eval_fraction 0) so all sides train
on the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch
from mcp import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.api.mcp import build_mcp_server
from server.context import ServiceRef
from server.service import open_service
from server.settings import Settings
from training_core import hardware, modelinfo, presets

SAMPLE = ROOT / "examples" / "sample_corpus"


def build_model(work: Path, preset: str) -> Path:
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    return presets.build_base_model(preset, texts, work / preset)


def plain(model_dir: Path, steps: int, batch: int, seq_len: int, *flags: str) -> dict[str, Any]:
    started = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_trl_sft.py"), str(model_dir),
                          str(SAMPLE / "support_chat.jsonl"), str(steps), str(batch), str(seq_len), *flags],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["start_to_first_step"] = result["first_step_time"] - started
    return result


def service_job(work: Path, model_dir: Path, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    settings = Settings(home=work / "home", data_roots=[SAMPLE, model_dir.parent], worker_slots=1)

    async def drive(ctx: Any) -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(ctx), toolsets=("all",))) as client:
            upload = await client.call_tool("upload_dataset", {"path": str(SAMPLE / "support_chat.jsonl")})
            ds = upload.structured_content["dataset"]["id"]
            called = time.time()
            launched = await client.call_tool("launch_training", {
                "base_model": str(model_dir), "datasets": [ds], "adapter": "full",
                # The plain script's schedule and seed (TRL's defaults): linear decay, no warmup, seed 42.
                "hyperparameters": {"max_steps": steps, "per_device_batch_size": batch, "max_seq_length": seq_len,
                                    "learning_rate": 1e-3, "eval_fraction": 0.0, "save_steps": steps * 10,
                                    "lr_scheduler": "linear", "warmup_ratio": 0.0, "seed": 42}})
            job = launched.structured_content["job"]
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                job = (await client.call_tool("wait_for_job", {"job_id": job["id"]})).structured_content
            assert job["state"] == "succeeded", job["error"]
            events = (await client.call_tool("get_job_events", {"job_id": job["id"], "limit": 200})).structured_content
            first = next(e for e in events["events"] if e["message"] == "first optimizer step")
            from datetime import datetime

            first_time = datetime.fromisoformat(first["time"]).timestamp()
            history = await client.call_tool("get_metric_history", {"job_id": job["id"], "metric": "loss",
                                                                     "max_points": 1000})
            assert not history.is_error, history.content[0].text
            losses = history.structured_content["values"]
            metrics = job["metrics"]
            return {"tokens_per_second": metrics["tokens_per_second"], "call_to_first_step": first_time - called,
                    "tokens_per_cpu_second": metrics["tokens_per_cpu_second"],
                    "mfu": metrics.get("mfu"), "precision": metrics.get("precision"),
                    "train_loss": metrics["train_loss"], "final_loss": sum(losses[-5:]) / len(losses[-5:])}

    with open_service(settings) as ctx:
        return anyio.run(drive, ctx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="Alternating runs of each side; medians.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each side (OMP_NUM_THREADS).")
    parser.add_argument("--preset", default="small", help="model size; on a GPU, 125m says more")
    args = parser.parse_args()
    # Every side inherits it: the service's child keeps an OMP_NUM_THREADS it is given.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)  # and the matmul peaks here are measured with as many
    device = hardware.pick_device()
    peaks = {"fp32": hardware.measure_matmul_peak_flops(device, torch.float32),
             "bf16": hardware.measure_matmul_peak_flops(device, torch.bfloat16)}
    hardware.use_bf16(device)  # a CPU's once-a-machine probe, so no side's first run pays for it
    shape = (args.steps, args.batch, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work, args.preset)
        params = modelinfo.count_parameters(model_dir)
        plain(model_dir, 1, args.batch, args.seq_len)  # warm-up: file cache and bytecode for every side
        sides: dict[str, list[dict[str, Any]]] = {"plain": [], "plain_bf16": [], "job": []}
        for index in range(args.repeats):  # alternated, so drift in machine load hits every side alike
            sides["plain"].append(plain(model_dir, *shape))
            sides["plain_bf16"].append(plain(model_dir, *shape, "--bf16"))
            sides["job"].append(service_job(work / f"run{index}", model_dir, *shape))
    keys = ("tokens_per_second", "tokens_per_cpu_second", "train_loss", "final_loss")
    med = {side: {key: statistics.median(run[key] for run in runs) for key in keys} for side, runs in sides.items()}
    med["plain"]["to_first_step"] = statistics.median(r["start_to_first_step"] for r in sides["plain"])
    med["plain_bf16"]["to_first_step"] = statistics.median(r["start_to_first_step"] for r in sides["plain_bf16"])
    med["job"]["to_first_step"] = statistics.median(r["call_to_first_step"] for r in sides["job"])
    precision = {side: runs[0]["precision"] for side, runs in sides.items()}
    job_mfu = statistics.median(r["mfu"] for r in sides["job"])
    print(f"model: {params:,} parameters; {args.steps} steps x batch {args.batch} x seq {args.seq_len}; {device}, "
          f"{args.threads} thread(s); median of {args.repeats} alternating runs; matmul peak "
          f"{peaks['fp32'] / 1e9:.1f} GFLOP/s fp32, {peaks['bf16'] / 1e9:.1f} bf16")
    print(f"{'':26}{'precision':>10}{'tokens/s':>10}{'MFU':>7}{'tok/CPU-s':>11}{'train loss':>12}"
          f"{'final loss':>12}{'to step 1 (s)':>15}")
    names = {"plain": "plain TRL script", "plain_bf16": "plain TRL script, bf16", "job": "launch_training job"}
    for side, figures in med.items():
        mfu = 6 * params * figures["tokens_per_second"] / peaks[precision[side]]
        print(f"{names[side]:26}{precision[side]:>10}{figures['tokens_per_second']:10,.0f}{mfu:7.1%}"
              f"{figures['tokens_per_cpu_second']:11,.0f}{figures['train_loss']:12.4f}{figures['final_loss']:12.4f}"
              f"{figures['to_first_step']:15.2f}")
    job = med["job"]
    print(f"job's own MFU (its child's peak measurement): {job_mfu:.1%}")
    for key, unit in (("tokens_per_second", "tokens/s"), ("tokens_per_cpu_second", "tokens per CPU-second")):
        print(f"{unit} ratio job / plain: {job[key] / med['plain'][key]:.2f}x (target >= 1.5); job / plain bf16: "
              f"{job[key] / med['plain_bf16'][key]:.2f}x (target >= 1.1)")
    print(f"final loss job / plain: {job['final_loss'] / med['plain']['final_loss']:.4f}; mean loss job / plain: "
          f"{job['train_loss'] / med['plain']['train_loss']:.4f} (target <= 1.02)")
    print(f"service overhead to first step: {job['to_first_step'] - med['plain']['to_first_step']:+.2f} s "
          "(target <= 1.5 s)")


if __name__ == "__main__":
    main()
