"""Tuning with TPE and Hyperband against random search without pruning, at the same number of trials.

    .venv/bin/python benchmarks/tune_vs_random.py [--trials 12] [--seeds 2] [--first-seed 0] [--steps 48]

The task: pre-train the `tiny` preset (~1M parameters, a tokenizer trained on the sample corpus)
on the sample corpus in 64-token blocks, 48 steps of 8 blocks, and minimise the held-out loss over
learning rate (log 1e-5..1e-1), warm-up ratio and weight decay. Both searches run the same number
of trials on the same task; the tuned one uses the service's own sampler and pruner settings
(`server.optuna_study.make_sampler` / `make_pruner`: TPE, Hyperband on optimizer steps, reports every
`eval_steps`), the baseline a seeded random sampler and no pruner.

Compute is counted as the service counts it: 6 x parameters x trained tokens. For each seed it
prints random search's best held-out loss and the compute it spent (all its trials run in full),
the compute TPE+Hyperband had spent when a trial first matched that loss, and the ratio of the
two (the target is <= 0.4); then the median ratio over seeds.

Trials train in this process with a plain torch loop rather than as service jobs: a job costs a
few seconds of process start and model loading, and hundreds of trials must fit in minutes on two
CPU cores. The study driver that turns the same Optuna calls into jobs is tested in
`tests/server/test_tune.py`.

Measured 2026-11-23 with the defaults, seeds 0-4 (two runs), two busy CPU cores: ratios 0.08,
0.56, 0.17, and twice never reached (random search found the better loss); Hyperband pruned 7-10
of the 12 trials and TPE+Hyperband used 0.42-0.60 of random search's compute in all. The 0.4 target
is met in 2 of 5 seeds, not reliably: at 12 trials, the trials it prunes leave TPE few complete
ones. With `--eval-steps 16` (fewer, later rungs) seeds 0-2 gave 0.08, 0.94, 0.17.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.optuna_study import make_pruner, make_sampler
from training_core import presets

SAMPLE = ROOT / "examples" / "sample_corpus"
BLOCK, BATCH = 64, 8


@dataclass
class Task:
    model_dir: Path
    parameters: int
    train: torch.Tensor
    held_out: torch.Tensor
    steps: int
    eval_steps: int

    @property
    def flops_per_step(self) -> float:
        return 6.0 * self.parameters * BATCH * BLOCK


@dataclass
class Search:
    values: list[float | None]
    """Each trial's held-out loss after training; None for a pruned trial."""
    flops: list[float]

    def best(self) -> float:
        return min(v for v in self.values if v is not None)

    def flops_to_reach(self, target: float) -> float | None:
        spent = 0.0
        for value, flops in zip(self.values, self.flops, strict=True):
            spent += flops
            if value is not None and value <= target:
                return spent
        return None


def build_task(work: Path, steps: int, eval_steps: int) -> Task:
    texts = [(SAMPLE / name).read_text(encoding="utf-8") for name in ("procedures.txt", "tickets.txt")]
    model_dir = presets.build_base_model("tiny", texts, work / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    held = max(8, len(blocks) // 10)
    parameters = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
    return Task(model_dir, parameters, blocks[order[held:]], blocks[order[:held]], steps, eval_steps)


def train(task: Task, params: dict[str, float], trial: optuna.trial.Trial | None) -> tuple[float | None, float]:
    """(held-out loss after training, or None if pruned; FLOPs used)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(task.model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["learning_rate"],
                                  weight_decay=params["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(optimizer, round(params["warmup_ratio"] * task.steps), task.steps)
    batches = torch.randperm(len(task.train) * 4, generator=torch.Generator().manual_seed(1)) % len(task.train)
    for step in range(1, task.steps + 1):
        model.train()
        batch = task.train[batches[(step - 1) * BATCH: step * BATCH]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if trial is not None and step % task.eval_steps == 0 and step < task.steps:
            trial.report(evaluate(model, task), step)
            if trial.should_prune():
                return None, step * task.flops_per_step
    return evaluate(model, task), task.steps * task.flops_per_step


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task) -> float:
    model.eval()
    loss = model(input_ids=task.held_out, labels=task.held_out).loss.item()
    return loss if math.isfinite(loss) else 1e9  # a diverged run is as bad as it gets, not an error


def search(task: Task, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
           trials: int) -> Search:
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    space = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
             "warmup_ratio": optuna.distributions.FloatDistribution(0.0, 0.3),
             "weight_decay": optuna.distributions.FloatDistribution(0.0, 0.2)}
    result = Search([], [])
    for _ in range(trials):
        trial = study.ask(space)
        value, flops = train(task, trial.params, trial)
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
        result.values.append(value)
        result.flops.append(flops)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--eval-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    # One thread: the service gives each training child its share of the cores too, and on a busy
    # two-core machine more threads only stall on each other.
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        task = build_task(Path(work), args.steps, args.eval_steps)
        print(f"task: tiny preset, {task.parameters:,} parameters, {len(task.train)} training and "
              f"{len(task.held_out)} held-out blocks of {BLOCK} tokens; {args.steps} steps of {BATCH} blocks "
              f"({task.flops_per_step * args.steps:.3g} FLOPs a full trial); {args.trials} trials per search")
        ratios = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            random = search(task, optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner(), args.trials)
            # Another seed: TPE's random start-up trials would otherwise repeat the baseline's first ones.
            strategy = {"sampler": "tpe", "seed": 1000 + seed}
            tuned = search(task, make_sampler(strategy, args.trials, 1),
                           make_pruner("hyperband", args.eval_steps, args.steps), args.trials)
            target, random_flops = random.best(), sum(random.flops)
            reached = tuned.flops_to_reach(target)
            ratio = reached / random_flops if reached is not None else math.inf
            ratios.append(ratio)
            pruned = sum(v is None for v in tuned.values)
            print(f"seed {seed}: random best {target:.4f} using {random_flops:.3g} FLOPs "
                  f"(its best found after {random.flops_to_reach(target):.3g}); TPE+Hyperband best "
                  f"{tuned.best():.4f}, {pruned}/{args.trials} pruned, {sum(tuned.flops):.3g} FLOPs in all, "
                  + (f"reached random's best after {reached:.3g} FLOPs: ratio {ratio:.2f}" if reached is not None
                     else "never reached random's best"))
    print(f"median ratio (compute to reach random search's best / random search's compute): "
          f"{statistics.median(ratios):.2f} (target <= 0.4); {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
