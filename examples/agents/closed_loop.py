"""A closed-loop agent: generate data, train, evaluate, promote if the gate passes, repeat.

    .venv/bin/python examples/agents/closed_loop.py [--rounds 2] [--home .weightsmith-agent]

This is the loop an LLM agent runs against weightsmith, written out as a script so every step is
visible. It starts the service over stdio (the way Claude Code or Cursor start it) and uses only
MCP tools:

1. uploads the sample corpus (`examples/sample_corpus`): the Gridbook and tickets as text, the
   support chats split into a training set and a held-out set;
2. declares a KPI suite on the held-out chats (`create_eval_suite`);
3. pre-trains a tiny model from scratch on the documents (`launch_training`, method `pretrain`):
   the first promoted model;
4. each round: grows question-answer pairs from the Gridbook (`generate_synthetic_data`, template
   generator, decontaminated against the suite), fine-tunes the promoted model on them and the
   training chats with `eval_suite` set, waits for the eval job the service queues, and reads its
   report (`read_eval_report`): the gate against the parent decides whether the new model is
   promoted.

Everything runs on this machine's CPU in a few minutes; the numbers are small because the model
is, but the loop is the one a real agent runs at any scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "sample_corpus"
FINAL = ("succeeded", "failed", "cancelled")

SUITE = """
name: nightwatch-answers
dataset: {dataset}
decoding: {{max_new_tokens: 32, batch_size: 8}}
kpis:
  - name: overlap
    grader: {{type: similarity, metric: rouge_l}}
    allowed_regression: 0.02
  - name: ppl
    grader: {{type: perplexity}}
    direction: lower
    aggregation: median
composite: "overlap + min(1, 10 / ppl)"
"""


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool}: {result.content[0].text}")
    return result.structured_content


async def wait(client: Client, job_id: str) -> dict[str, Any]:
    job = await call(client, "get_job", job_id=job_id)
    while job["state"] not in FINAL:
        job = await call(client, "wait_for_job", job_id=job_id, timeout_seconds=30)
        step = job["progress"].get("step")
        if step:
            print(f"    {job['kind']} {job_id}: step {step}/{job['progress'].get('max_steps')}", flush=True)
    if job["state"] != "succeeded":
        raise SystemExit(f"{job_id} {job['state']}: {job['error']}")
    return job


def upload_inline(records: list[dict[str, Any]], filename: str) -> dict[str, Any]:
    return {"filename": filename, "content": "".join(json.dumps(r) + "\n" for r in records)}


async def main(rounds: int, home: Path) -> None:
    env = {**os.environ, "WEIGHTSMITH_HOME": str(home), "WEIGHTSMITH_DATA_ROOTS": json.dumps([str(SAMPLE)]),
           "WEIGHTSMITH_WORKER_SLOTS": "1"}
    server = StdioServerParameters(command=sys.executable, args=["-m", "server.cli.main", "serve", "--stdio"], env=env,
                                   cwd=str(ROOT))
    async with Client(server) as client:
        # 1. Data.
        docs = [(await call(client, "upload_dataset", path=str(SAMPLE / name)))["dataset"]["id"]
                for name in ("procedures.txt", "tickets.txt")]
        chats = [json.loads(line) for line in (SAMPLE / "support_chat.jsonl").read_text().splitlines()]
        train_chats = (await call(client, "upload_dataset", **upload_inline(chats[:-40], "chats-train.jsonl")))
        held_out = (await call(client, "upload_dataset", **upload_inline(chats[-40:], "chats-heldout.jsonl")))
        print(f"datasets: documents {docs}, chats {train_chats['dataset']['id']} / {held_out['dataset']['id']}")

        # 2. What better means.
        suite = await call(client, "create_eval_suite", definition=SUITE.format(dataset=held_out["dataset"]["id"]))
        print(f"suite {suite['id']}: {suite['items']} items")

        # 3. A base model of our own.
        job = (await call(client, "launch_training", method="pretrain", datasets=docs, adapter="full",
                          options={"preset": "tiny", "vocab_size": 2048},
                          hyperparameters={"max_steps": 300, "learning_rate": 5e-3, "per_device_batch_size": 8,
                                           "max_seq_length": 128}))["job"]
        promoted = (await wait(client, job["id"]))["model_id"]
        print(f"pre-trained and promoted {promoted}")

        # 4. Improve it, round after round, keeping only what the gate accepts.
        for round_number in range(1, rounds + 1):
            synth = (await call(client, "generate_synthetic_data", task="qa_from_documents", sources=[docs[0]],
                                num_records=60, seed=round_number,
                                options={"system_prompt": chats[0]["messages"][0]["content"]}, generator={
                                    "type": "template",
                                    "templates": [{"prompt": "What does the Gridbook say here: {sentence}",
                                                   "completion": "{chunk}"}]}))
            generated = (await wait(client, synth["job_id"]))["metrics"]
            print(f"round {round_number}: generated {generated['records']} QA records ({generated['dataset_id']})")
            train = (await call(client, "launch_training", method="sft", base_model=promoted, adapter="full",
                                datasets=[train_chats["dataset"]["id"], generated["dataset_id"]],
                                eval_suite=suite["id"],
                                hyperparameters={"max_steps": 60, "learning_rate": 2e-3, "per_device_batch_size": 8,
                                                 "max_seq_length": 128}))["job"]
            candidate = (await wait(client, train["id"]))["model_id"]
            evals = (await call(client, "list_jobs", kind="eval", limit=1))["jobs"]
            await wait(client, evals[0]["id"])
            report = await call(client, "read_eval_report", ref=candidate)
            rows = ", ".join(f"{k['name']} {k.get('value')}" for k in report.get("kpis", []))
            print(f"round {round_number}: {candidate} verdict {report['verdict']} ({rows})")
            if report["verdict"] == "pass":
                promoted = candidate
                print(f"round {round_number}: promoted {promoted}")
            else:
                print(f"round {round_number}: kept {promoted}; next: {report.get('next_steps')}")
        print(f"final model: {promoted}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--home", type=Path, default=ROOT / ".weightsmith-agent")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.home.resolve()))
