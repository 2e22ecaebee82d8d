"""An experimenter agent: price candidate runs, tune within a budget, train the best, write it up.

    .venv/bin/python examples/agents/experimenter.py [--trials 4] [--max-steps 40] [--budget FLOPS]
                                                    [--home DIR] [--summary FILE]

This is the session a coding agent runs when it is asked "find a good fine-tuning recipe for the
Nightwatch assistant, and tell me what it cost". It starts the service over stdio (the way Claude
Code or Cursor start it) and uses only MCP tools:

1. uploads the sample corpus (`examples/sample_corpus`), holds out the last support chats as an
   eval suite (`create_eval_suite`) and pre-trains a tiny base model on the documents and the
   training chats (`launch_training`, method `pretrain`), as `make demo` does;
2. prices candidate fine-tuning runs with `launch_training(dry_run=true)`: FLOPs, the verdict
   against its limits, and what is left of its budget;
3. runs a `tune_hyperparameters` study (LoRA rank and learning rate, held-out loss, Hyperband
   pruning) within a FLOPs budget it chooses from those prices, and waits for it;
4. trains the study's best parameters for longer with the eval suite attached, and reads the
   report (`read_eval_report`): the fine-tuned model against its base on the held-out chats;
5. writes a Markdown summary: the trials and their objective, the compute each job used and the
   budget, the best configuration and its KPIs against the baseline.

The defaults run in a few minutes on two CPU cores; the numbers are small because the model is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "sample_corpus"
FINAL = ("succeeded", "failed", "cancelled")
HELD_OUT_EVERY = 10
"""Every tenth chat is kept out of all training, for the eval suite: spread over the file, so it
covers the same topics as the training chats (the file is grouped by topic), and small enough to
generate for in seconds."""

SUITE = """
name: nightwatch-experimenter
dataset: {dataset}
decoding: {{max_new_tokens: 24, batch_size: 8}}
kpis:
  - name: overlap
    grader: {{type: similarity, metric: rouge_l}}
    allowed_regression: 0.02
  - name: ppl
    grader: {{type: perplexity}}
    direction: lower
    aggregation: median
    allowed_regression: 5
"""

SEARCH_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "lora.r": {"type": "categorical", "choices": [4, 8, 16]},
}


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool}: {result.content[0].text}")
    return result.structured_content


async def wait(client: Client, job_id: str, label: str) -> dict[str, Any]:
    """Poll wait_for_job (each call returns within ~50 s) until the job ends; print its progress."""
    job = await call(client, "get_job", job_id=job_id)
    last = None
    while job["state"] not in FINAL:
        job = await call(client, "wait_for_job", job_id=job_id, timeout_seconds=30)
        step = (job["progress"].get("step"), job["progress"].get("max_steps"))
        if step[0] and step != last:
            last = step
            print(f"    {label} {job_id}: {step[0]}/{step[1]}", flush=True)
    if job["state"] != "succeeded":
        raise SystemExit(f"{label} {job_id} {job['state']}: {job['error']}")
    return job


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def chats_as_text(chats: list[dict[str, Any]]) -> str:
    """Each chat's question and answer as one paragraph, so pre-training learns the domain's words."""
    paragraphs = ("\n".join(t["content"] for t in c["messages"] if t["role"] != "system") for c in chats)
    return "\n\n".join(paragraphs) + "\n"


def sft_request(base: str, dataset: str, max_steps: int, learning_rate: float, adapter: str = "lora",
                rank: int | None = 8, **extra: Any) -> dict[str, Any]:
    request = {"method": "sft", "base_model": base, "datasets": [dataset], "adapter": adapter,
               "hyperparameters": {"max_steps": max_steps, "learning_rate": learning_rate,
                                   "per_device_batch_size": 8, "max_seq_length": 128}, **extra}
    if adapter == "lora":
        request["lora"] = {"r": rank, "alpha": 2 * rank}
    return request


async def prepare(client: Client, pretrain_steps: int) -> dict[str, Any]:
    """Step 1: datasets, the eval suite and a base model of our own."""
    docs = [(await call(client, "upload_dataset", path=str(SAMPLE / name)))["dataset"]["id"]
            for name in ("procedures.txt", "tickets.txt")]
    lines = (SAMPLE / "support_chat.jsonl").read_text(encoding="utf-8").splitlines()
    chats = [json.loads(line) for line in lines]
    held_out = chats[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    train = [chat for number, chat in enumerate(chats, 1) if number % HELD_OUT_EVERY]
    train_id = (await call(client, "upload_dataset", filename="chats-train.jsonl", content=jsonl(train)))
    held_id = (await call(client, "upload_dataset", filename="chats-heldout.jsonl", content=jsonl(held_out)))
    # The held-out chats stay out of pre-training too, or the suite would measure recall of them.
    text = (await call(client, "upload_dataset", filename="chats-train.txt", content=chats_as_text(train)))
    suite = await call(client, "create_eval_suite", definition=SUITE.format(dataset=held_id["dataset"]["id"]))
    print(f"datasets: documents {docs}, chats {train_id['dataset']['id']} ({len(train)}) / held out "
          f"{held_id['dataset']['id']} ({len(held_out)}); suite {suite['id']}: {suite['items']} items")
    pretrain = {"method": "pretrain", "datasets": [*docs, text["dataset"]["id"]], "adapter": "full",
                "options": {"preset": "tiny", "vocab_size": 2048}, "model_name": "halvard-base",
                "hyperparameters": {"max_steps": pretrain_steps, "learning_rate": 5e-3,
                                    "per_device_batch_size": 8, "max_seq_length": 128}}
    job = await wait(client, (await call(client, "launch_training", **pretrain))["job"]["id"], "pretrain")
    print(f"base model {job['model_id']} (pre-trained {pretrain_steps} steps, {job['flops_used']:.3g} FLOPs)")
    return {"base": job["model_id"], "chats": train_id["dataset"]["id"], "train_chats": len(train),
            "held_out": len(held_out), "suite": suite["id"], "pretrain": job}


async def price_candidates(client: Client, base: str, chats: str, max_steps: int) -> list[dict[str, Any]]:
    """Step 2: what each kind of run would cost before spending anything."""
    # A trial's price first: the study's budget is counted in trials. The FLOPs estimate grows with
    # tokens (steps x batch x length), not with the LoRA rank, so the candidates vary those.
    candidates = {
        "one trial (lora r=16)": sft_request(base, chats, max_steps, 3e-3, rank=16),
        "lora, batch 16": {**sft_request(base, chats, max_steps, 3e-3, rank=16), "hyperparameters": {
            "max_steps": max_steps, "learning_rate": 3e-3, "per_device_batch_size": 16,
            "max_seq_length": 128}},
        "full fine-tune, 4x steps": sft_request(base, chats, 4 * max_steps, 1e-3, adapter="full", rank=None),
        "lora, 2M steps": sft_request(base, chats, 2_000_000, 3e-3, rank=16),
    }
    priced = []
    print("dry runs (launch_training dry_run=true):")
    for name, request in candidates.items():
        answer = await call(client, "launch_training", **request, dry_run=True)
        est = answer["estimate"]
        verdict = "admitted" if answer["admitted"] else f"refused: {answer['refusal']}"
        print(f"  {name:<26} {est['max_steps']:>9,} steps x {est['tokens_per_step']:,} tokens = "
              f"{est['flops']:.3g} FLOPs  {verdict}")
        priced.append({"name": name, "steps": est["max_steps"], "tokens": est["tokens"],
                       "flops": est["flops"], "admitted": answer["admitted"], "refusal": answer["refusal"],
                       "budget_left": answer["budget_flops_left"]})
    print(f"  budget left: {priced[-1]['budget_left']:.3g} FLOPs")
    return priced


async def tune(client: Client, base: str, chats: str, max_steps: int, trials: int,
               budget: float) -> dict[str, Any]:
    """Step 3: the study, within the budget; Hyperband stops trials whose held-out loss lags."""
    template = sft_request(base, chats, max_steps, 3e-3)
    started = await call(client, "tune_hyperparameters", template=template, search_space=SEARCH_SPACE,
                         n_trials=trials, budget_flops=budget, strategy={"sampler": "tpe", "seed": 0})
    print(f"study {started['study_id']}: {trials} trials, budget {started['budget_flops']:.3g} FLOPs, "
          f"a trial up to {started['trial_estimate_flops']:.3g}")
    study = await wait(client, started["study_id"], "study trials")
    m = study["metrics"]
    for trial in m["trials"]:
        value = "-" if trial["value"] is None else f"{trial['value']:.4f}"
        print(f"  trial {trial['number']}: {trial['state']:<8} eval_loss {value}  {trial['params']}  "
              f"{trial['flops_used']:.3g} FLOPs")
    print(f"best: trial {m['best_trial']} eval_loss {m['best_value']:.4f} {m['best_params']} "
          f"({m['stopped_reason']}; {m['flops_used']:.3g} of {m['budget_flops']:.3g} FLOPs used)")
    return study


async def train_best(client: Client, base: str, chats: str, suite: str, params: dict[str, Any],
                     steps: int) -> dict[str, Any]:
    """Step 4: the best parameters trained for longer, evaluated against the base on the suite."""
    request = sft_request(base, chats, steps, params["learning_rate"], rank=int(params["lora.r"]),
                          eval_suite=suite, model_name="halvard-experimenter")
    priced = await call(client, "launch_training", **request, dry_run=True)
    print(f"final run priced at {priced['estimate']['flops']:.3g} FLOPs "
          f"({'admitted' if priced['admitted'] else priced['refusal']})")
    job = await wait(client, (await call(client, "launch_training", **request))["job"]["id"], "final")
    # The service queues the eval itself once the model is registered, and says so in an event.
    events = (await call(client, "get_job_events", job_id=job["id"], limit=200))["events"]
    eval_id = next(e["data"]["eval_job_id"] for e in events if "eval_job_id" in (e.get("data") or {}))
    evaluation = await wait(client, eval_id, "eval")
    report = await call(client, "read_eval_report", ref=job["model_id"])
    for kpi in report["kpis"]:
        gate = kpi.get("gate") or {}
        vs = f" vs base {gate['baseline']:.4g} (p={gate['p_value']:.3g}, {gate['verdict']})" if gate else ""
        print(f"  {kpi['name']}: {kpi['value']:.4g}{vs}")
    print(f"report {report['id']}: {report['verdict']}")
    return {"job": job, "eval": evaluation, "report": report}


def wall_seconds(job: dict[str, Any]) -> float:
    """From the job's start to its end, as the service recorded them."""
    start, end = (datetime.fromisoformat(job[key]) for key in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def trained_tokens(job: dict[str, Any]) -> str:
    """Tokens a train job trained on. A job reports the FLOPs it used, which the service counts as
    6 x parameters x tokens for SFT and pre-training, so this is exact, not another estimate."""
    parameters = job["metrics"].get("parameters")
    return f"{job['flops_used'] / (6 * parameters):,.0f}" if parameters else "-"


def summary_markdown(args: argparse.Namespace, prepared: dict[str, Any], priced: list[dict[str, Any]],
                     study: dict[str, Any], final: dict[str, Any], quota: dict[str, Any],
                     seconds: float) -> str:
    m, job, report = study["metrics"], final["job"], final["report"]
    best, fm = m["best_params"], job["metrics"]
    space = ", ".join(f"`{k}` {v.get('choices') or [v['low'], v['high']]}" for k, v in SEARCH_SPACE.items())
    lines = [
        "# Experimenter session: Halvard Fibre Nightwatch assistant", "",
        (f"Base model `{prepared['base']}` (tiny preset, pre-trained {args.pretrain_steps} steps on the "
         f"Gridbook, tickets and training chats); LoRA SFT on {prepared['train_chats']} support chats; "
         f"eval suite `{prepared['suite']}` ({prepared['held_out']} held-out chats). Session wall time "
         f"{seconds:.0f} s."),
        "", "## Prices (dry runs)", "",
        "| candidate | steps | tokens | FLOPs | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['steps']:,} | {p['tokens']:,} | {p['flops']:.3g} | "
              f"{'admitted' if p['admitted'] else 'refused: ' + str(p['refusal'])} |" for p in priced]
    lines += [
        "", f"## What it tried: study `{study['id']}`", "",
        (f"Objective {m['objective']} ({m['direction']}), TPE sampler, "
         f"{study['method'].split('+')[1]} pruning, {args.trials} trials of {args.max_steps} steps; "
         f"search space: {space}."),
        "", "| trial | state | learning_rate | lora.r | eval_loss | FLOPs |", "|---|---|---|---|---|---|"]
    for t in m["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        lines.append(f"| {t['number']} | {t['state']} | {t['params'].get('learning_rate', 0):.3g} | "
                     f"{t['params'].get('lora.r')} | {value} | {t['flops_used']:.3g} |")
    if m.get("trials_omitted"):
        lines.append(f"\n({m['trials_omitted']} more trials: {m['all_trials']})")
    lines += ["", "## What it spent", "", "| job | id | FLOPs used | tokens trained | wall seconds |",
              "|---|---|---|---|---|"]
    for name, j in (("pre-training", prepared["pretrain"]), ("study (all trials)", study),
                    ("final run", job), ("eval (model and base)", final["eval"])):
        tokens = trained_tokens(j) if j["kind"] == "train" else "-"
        lines.append(f"| {name} | `{j['id']}` | {j['flops_used']:.3g} | {tokens} | {wall_seconds(j):.0f} |")
    lines += [
        "", (f"Study budget {m['budget_flops']:.3g} FLOPs, used {m['flops_used']:.3g} "
             f"({m['flops_used'] / m['budget_flops']:.0%}; ended by {m['stopped_reason']}). The agent's "
             f"rolling budget: {quota['budget_flops_spent']:.3g} of {quota['budget_flops']:.3g} FLOPs "
             "spent."),
        "", "## What it found", "",
        (f"Best configuration (trial {m['best_trial']}): learning_rate {best['learning_rate']:.3g}, "
         f"lora.r {best['lora.r']} (held-out eval_loss {m['best_value']:.4f} after {args.max_steps} steps)."),
        "", (f"Final run `{job['id']}` -> model `{job['model_id']}`, {args.final_steps} steps: held-out "
             f"eval_loss {fm['eval_loss_before']:.4f} (base) -> {fm['eval_loss_after']:.4f}."),
        "", f"Report `{report['id']}` against the base model: verdict **{report['verdict']}**.", "",
        "| KPI | fine-tuned | base | delta [95% CI] | p | gate |", "|---|---|---|---|---|---|"]
    for kpi in report["kpis"]:
        g = kpi.get("gate")
        vs = (f"{g['baseline']:.4g} | {g['delta']:+.4g} [{g['ci95'][0]:+.4g}, {g['ci95'][1]:+.4g}] | "
              f"{g['p_value']:.3g} | {g['verdict']}") if g else "- | - | - | -"
        lines.append(f"| {kpi['name']} | {kpi['value']:.4g} | {vs} |")
    for item in report["items"][:2]:  # the worst items show what a score cannot: what the model says
        lines.append(f"\nWorst item {item['index']} {item['scores']}: answered {item['output'][:100]!r}, "
                     f"reference {item['reference'][:100]!r}")
    # Each KPI's gate may carry the same note: say it once.
    lines += ["", *(f"- next: {step}" for step in dict.fromkeys(report["next_steps"]))]
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    home = args.home or Path(tempfile.mkdtemp(prefix="weightsmith-experimenter-"))
    summary_path = (args.summary or home / "experimenter_summary.md").resolve()
    env = {**os.environ, "WEIGHTSMITH_HOME": str(home), "WEIGHTSMITH_DATA_ROOTS": json.dumps([str(SAMPLE)]),
           "WEIGHTSMITH_WORKER_SLOTS": "1"}
    server = StdioServerParameters(command=sys.executable, args=["-m", "server.cli.main", "serve", "--stdio"],
                                   env=env, cwd=str(ROOT))
    async with Client(server) as client:
        prepared = await prepare(client, args.pretrain_steps)
        priced = await price_candidates(client, prepared["base"], prepared["chats"], args.max_steps)
        # A trial's price times the trials, unless told otherwise: Hyperband stops the laggards early,
        # so a study usually spends well under it.
        budget = args.budget or args.trials * priced[0]["flops"]
        study = await tune(client, prepared["base"], prepared["chats"], args.max_steps, args.trials, budget)
        final = await train_best(client, prepared["base"], prepared["chats"], prepared["suite"],
                                 study["metrics"]["best_params"], args.final_steps)
        quota = await call(client, "get_quota")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(summary_markdown(args, prepared, priced, study, final, quota,
                                             time.monotonic() - started), encoding="utf-8")
    print(f"summary: {summary_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="Trials in the study.")
    parser.add_argument("--max-steps", type=int, default=40, help="Optimizer steps a trial.")
    parser.add_argument("--final-steps", type=int, default=None, help="Steps of the final run (default: 2x).")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="Steps pre-training the base model.")
    parser.add_argument("--budget", type=float, default=None,
                        help="The study's FLOPs budget (default: trials x a trial's dry-run price).")
    parser.add_argument("--home", type=Path, default=None,
                        help="Service home (default: a new temporary one).")
    parser.add_argument("--summary", type=Path, default=None,
                        help="Markdown summary (default: experimenter_summary.md in the home).")
    arguments = parser.parse_args()
    arguments.final_steps = arguments.final_steps or 2 * arguments.max_steps
    asyncio.run(main(arguments))
