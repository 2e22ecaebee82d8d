"""SFT throughput: a `launch_training` job against a plain TRL script, side by side in one run.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 40] [--batch 8] [--seq-len 128]

Same ~10M-parameter Llama-style model (preset `small`, tokenizer trained on the sample corpus),
same data (the sample support chats), same steps, full fine-tuning. The job is launched through
the real MCP client (in memory) against the embedded service (SQLite, one local worker). Prints
tokens/s of each and their ratio, MFU against this machine's measured matmul peak, and the time
from the tool call to the first optimizer step minus the plain script's start-to-first-step.
The job holds nothing out (eval_fraction 0) so both train on the same records.
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


def build_model(work: Path) -> Path:
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    return presets.build_base_model("small", texts, work / "small")


def plain(model_dir: Path, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    started = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plain_trl_sft.py"), str(model_dir),
                          str(SAMPLE / "support_chat.jsonl"), str(steps), str(batch), str(seq_len)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["start_to_first_step"] = result["first_step_time"] - started
    return result


def service_job(work: Path, model_dir: Path, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    settings = Settings(home=work / "home", data_roots=[SAMPLE, model_dir.parent], worker_slots=1)

    async def drive(ctx: Any) -> dict[str, Any]:
        async with Client(build_mcp_server(ServiceRef(ctx))) as client:
            upload = await client.call_tool("upload_dataset", {"path": str(SAMPLE / "support_chat.jsonl")})
            ds = upload.structured_content["dataset"]["id"]
            called = time.time()
            launched = await client.call_tool("launch_training", {
                "base_model": str(model_dir), "datasets": [ds], "adapter": "full",
                "hyperparameters": {"max_steps": steps, "per_device_batch_size": batch, "max_seq_length": seq_len,
                                    "learning_rate": 1e-3, "eval_fraction": 0.0, "save_steps": steps * 10}})
            job = launched.structured_content["job"]
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                job = (await client.call_tool("wait_for_job", {"job_id": job["id"]})).structured_content
            assert job["state"] == "succeeded", job["error"]
            events = (await client.call_tool("get_job_events", {"job_id": job["id"], "limit": 200})).structured_content
            first = next(e for e in events["events"] if e["message"] == "first optimizer step")
            from datetime import datetime

            first_time = datetime.fromisoformat(first["time"]).timestamp()
            return {"tokens_per_second": job["metrics"]["tokens_per_second"], "call_to_first_step": first_time - called,
                    "mfu": job["metrics"].get("mfu")}

    with open_service(settings) as ctx:
        return anyio.run(drive, ctx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="Alternating runs of each side; medians.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each side (OMP_NUM_THREADS).")
    args = parser.parse_args()
    # Both sides inherit it: the service's child keeps an OMP_NUM_THREADS it is given.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)  # and the matmul peak here is measured with as many
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work)
        params = modelinfo.count_parameters(model_dir)
        peak = hardware.measure_matmul_peak_flops("cpu")
        plain(model_dir, 1, args.batch, args.seq_len)  # warm-up: file cache and bytecode for both sides
        runs = []
        for index in range(args.repeats):  # alternated, so drift in machine load hits both sides alike
            runs.append((plain(model_dir, args.steps, args.batch, args.seq_len),
                         service_job(work / f"run{index}", model_dir, args.steps, args.batch, args.seq_len)))
    base = {k: statistics.median(r[0][k] for r in runs) for k in ("tokens_per_second", "start_to_first_step")}
    job = {k: statistics.median(r[1][k] for r in runs) for k in ("tokens_per_second", "call_to_first_step")}
    mfu = lambda tps: 6 * params * tps / peak
    print(f"model: {params:,} parameters; {args.steps} steps x batch {args.batch} x seq {args.seq_len}; "
          f"{args.threads} thread(s); median of {args.repeats} alternating runs; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':24}{'tokens/s':>12}{'MFU':>8}{'start->step 1 (s)':>20}")
    print(f"{'plain TRL script':24}{base['tokens_per_second']:12,.0f}{mfu(base['tokens_per_second']):8.1%}"
          f"{base['start_to_first_step']:20.2f}")
    print(f"{'launch_training job':24}{job['tokens_per_second']:12,.0f}{mfu(job['tokens_per_second']):8.1%}"
          f"{job['call_to_first_step']:20.2f}")
    print(f"throughput ratio (job / plain): {job['tokens_per_second'] / base['tokens_per_second']:.2f}x  (target >= 1.0)")
    print(f"service overhead to first step: {job['call_to_first_step'] - base['start_to_first_step']:+.2f} s "
          "(target <= 1.5 s)")


if __name__ == "__main__":
    main()
