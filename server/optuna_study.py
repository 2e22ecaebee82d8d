"""A tune job's Optuna study: where it is stored, and the sampler, pruner and distributions its
strategy and search space name. The study driver (`server/study.py`) opens studies with these; the
benchmarks build the same sampler and pruner.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import optuna

from server.models import Job
from tools.tune_hyperparameters import ParamSpace


@functools.cache
def studies_storage(url: str) -> optuna.storages.RDBStorage:
    """One Optuna storage (and engine) per URL in this process, shared by every driver."""
    # Several drivers, optuna-dashboard and, by default, the service itself write one SQLite file:
    # wait for its lock, as our own engine does, instead of failing at once with "database is
    # locked". The file is in WAL mode (set by the service's engine; it persists), and pysqlite
    # begins a transaction only at its first write, so Optuna never waits for the lock holding a
    # stale read snapshot (which SQLite would refuse at once, timeout or not).
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def open_study(job: Job, attempt: int = 1) -> optuna.Study:
    strategy = job.resolved["strategy"]
    return optuna.create_study(
        storage=studies_storage(job.resolved["studies_url"]), study_name=job.id, load_if_exists=True,
        direction=strategy["direction"], sampler=make_sampler(strategy, job.resolved["n_trials"], attempt),
        pruner=make_pruner(strategy["pruner"], job.resolved["eval_steps"], job.resolved["max_steps"]))


def make_sampler(strategy: dict[str, Any], n_trials: int, attempt: int) -> optuna.samplers.BaseSampler:
    # A seeded sampler restarted mid-study would draw its first parameters again: each run of the
    # driver seeds it differently (samplers that model the history read it from the storage).
    seed = None if strategy["seed"] is None else strategy["seed"] + attempt - 1
    name = strategy["sampler"]
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    # Studies here run tens of trials, not hundreds, and Optuna's TPE defaults are made for hundreds:
    # - 10 random start-up trials would be most of a study;
    # - its "good" trials are the best 10%: 2 of 20, too few to model, so its proposals stay nearly
    #   random (`small_study_gamma`). On `benchmarks/tune_vs_random.py`'s 10 seeds, the best quarter
    #   matched random search's best in 6 rather than 5, at a median 0.66 of its compute (not 0.4).
    # Multivariate (one density over all parameters: a learning rate is good only with a matching
    # warm-up) is Optuna 5's default for one objective; said here for Optuna 4.
    with warnings.catch_warnings():
        # Optuna 5 deprecates `gamma` (removal in 6; pyproject pins optuna < 6) without a successor.
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 4)),
                                          multivariate=True, gamma=small_study_gamma)


def small_study_gamma(n_finished: int) -> int:
    """How many of the finished trials TPE models as the good ones: the best quarter rather than
    Optuna's tenth, at most 25 as in Optuna (for the rare large study)."""
    return min(math.ceil(0.25 * n_finished), 25)


def make_pruner(name: str, eval_steps: int, max_steps: int) -> optuna.pruners.BasePruner:
    # Resources are optimizer steps, reported at every evaluation (every `eval_steps`).
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_steps, max_resource=max(max_steps, eval_steps),
                                              reduction_factor=3)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_steps, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=eval_steps)
    return optuna.pruners.NopPruner()


def warmed_up(step: int, hyperparameters: dict[str, Any]) -> bool:
    """Whether a trial at `step` has finished its learning-rate warm-up and may be pruned.

    Before, its held-out loss says how long its warm-up is more than how good its parameters are:
    Hyperband's first rungs would prune every long warm-up, however good (on the benchmark's earlier
    task, 8 blocks a step, the best trials warmed up for a quarter of their steps). A trial first
    judged after its warm-up is compared at each rung it has passed with the others' values at that
    rung, a bar it clears more easily for having trained longer: the rule errs towards keeping a trial.
    """
    return step > math.ceil(float(hyperparameters.get("warmup_ratio") or 0.0) * int(hyperparameters["max_steps"]))


def distributions(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    result: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, raw in space.items():
        param = ParamSpace.model_validate(raw)
        if param.type == "categorical":
            result[name] = optuna.distributions.CategoricalDistribution(param.choices or [])
        elif param.type == "int":
            result[name] = optuna.distributions.IntDistribution(int(param.low or 0), int(param.high or 0),
                                                               log=param.log)
        else:
            result[name] = optuna.distributions.FloatDistribution(param.low or 0.0, param.high or 0.0, log=param.log)
    return result
