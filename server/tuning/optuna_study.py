"""A tune job's Optuna study: where it is stored, and the sampler, pruner and distributions its
strategy and search space name. The study driver (`server/study.py`) opens studies with these; the
benchmarks build the same sampler and pruner.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Any

import optuna
import sqlalchemy.exc

from server.store.db import SQLITE_BUSY_TIMEOUT_S, without_password
from server.store.tables import Job
from server.tuning.admission import ParamSpace


@functools.cache
def studies_storage(url: str) -> optuna.storages.RDBStorage:
    """One Optuna storage (and engine) per URL in this process, shared by every driver.

    Optuna makes its tables and stamps its schema version when a storage first opens a database; two
    processes (or drivers) doing so at once on a fresh one race, and the loser's CREATE TABLE or
    version stamp fails (seen: "table studies already exists", "UNIQUE constraint failed:
    alembic_version.version_num"). The loser opens the storage again rather than give the study up;
    with several at once the winner may still be stamping the version, so it tries a few times."""
    for attempt in range(4):
        try:
            return _storage(url)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError):
            time.sleep(0.2 * (attempt + 1))
    return _storage(url)


def _storage(url: str) -> optuna.storages.RDBStorage:
    # Several drivers, optuna-dashboard and, by default, the service itself write one SQLite file:
    # wait for its lock, as our own engine does, instead of failing at once with "database is
    # locked". The file is in WAL mode (set by the service's engine; it persists), and pysqlite
    # begins a transaction only at its first write, so Optuna never waits for the lock holding a
    # stale read snapshot (which SQLite would refuse at once, timeout or not).
    kwargs: dict[str, Any] = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite")
                              else {"pool_pre_ping": True})
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class StudyStoreMoved(Exception):
    """The service's studies database is not the one the study was created in."""


def open_study(job: Job, studies_url: str) -> optuna.Study:
    """The tune job's study in `studies_url`, the service's studies database (password and all), which
    must be where the study was created: opening it elsewhere would start it again from nothing."""
    created_in = without_password(job.resolved["studies_url"])  # masked since 2026-11-27 (revision 0007)
    service_has = without_password(studies_url)
    if service_has != created_in:
        raise StudyStoreMoved(f"study {job.id} is in the studies database {created_in}, but the service's is now "
                              f"{service_has}; set studies_database_url (or database_url) back to resume studies "
                              "like it")
    strategy = job.resolved["strategy"]
    study = optuna.create_study(
        storage=studies_storage(studies_url), study_name=job.id, load_if_exists=True,
        direction=strategy["direction"], sampler=make_sampler(strategy, job.resolved["n_trials"], 0),
        pruner=make_pruner(strategy["pruner"], job.resolved["eval_steps"], job.resolved["max_steps"]))
    asked = len(study.get_trials(deepcopy=False))
    if asked:
        study.sampler = make_sampler(strategy, job.resolved["n_trials"], asked)
    return study


def make_sampler(strategy: dict[str, Any], n_trials: int, asked: int) -> optuna.samplers.BaseSampler:
    # A seeded sampler reopened mid-study would draw its first parameters again: it is seeded past
    # the trials already asked, so a study resumed after a restart (or a crash) asks what the same
    # study asks from that point, however many times its driver was restarted (samplers that model
    # the history read it from the storage).
    seed = None if strategy["seed"] is None else strategy["seed"] + asked
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


REDUCTION_FACTOR = 3
"""Hyperband's and successive halving's η: a third of the trials at a rung go on to the next."""


def make_pruner(name: str, eval_steps: int, max_steps: int) -> optuna.pruners.BasePruner:
    # Resources are optimizer steps, reported at every evaluation (every `eval_steps`).
    first, top = rungs(eval_steps, max_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=top, reduction_factor=REDUCTION_FACTOR)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=REDUCTION_FACTOR)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=eval_steps)
    return optuna.pruners.NopPruner()


def rungs(eval_steps: int, max_steps: int) -> tuple[int, int]:
    """Hyperband's (min_resource, max_resource): rungs at max_steps / η^k, ..., max_steps / η and the
    end of training, for the largest k whose first rung is at least one evaluation in.

    So each bracket's last rung is at (or, rounded up, past) the end of training, the last bracket
    is never pruned, and no trial is judged most of the way through, where pruning saves little and
    throws away a trial that had nearly finished. (From the first evaluation instead, every 6 of 72
    steps, rungs at 6, 18 and 54 pruned trials three quarters done: on the 20 seeds of
    `benchmarks/tune_vs_random.py`, TPE with Hyperband at rungs 8 and 24 matched random search's best
    in 13 rather than 7, spending 60% of random search's compute rather than 55%.) With fewer than η
    evaluations a trial there is no rung short of the end, and the first evaluation is the one rung.
    A rung between evaluations is judged at the next.
    """
    k = 0
    while max_steps / REDUCTION_FACTOR ** (k + 1) >= eval_steps:
        k += 1
    if k == 0:
        return eval_steps, max(max_steps, eval_steps)
    first = math.ceil(max_steps / REDUCTION_FACTOR**k)
    # Optuna counts brackets as floor(log_η(max / min)) + 1 in floating point, where log_3(243) comes out
    # a hair under 5: one step more keeps the last bracket, the one whose first rung is the end.
    return first, first * REDUCTION_FACTOR**k + 1


def prunable(step: int, hyperparameters: dict[str, Any]) -> bool:
    """Whether a trial at `step` may be pruned: its learning-rate warm-up has ended and its training
    has not. A trial evaluated at its last step has spent its compute, and pruning it would only lose
    its result (its top rung is the end of training; see `rungs`).

    Before the warm-up ends, its held-out loss says how long its warm-up is more than how good its
    parameters are: Hyperband's first rungs would prune every long warm-up, however good (on the
    benchmark's earlier task, 8 blocks a step, the best trials warmed up for a quarter of their
    steps). A trial first judged after its warm-up is compared at each rung it has passed with the
    others' values at that rung, a bar it clears more easily for having trained longer: the rule errs
    towards keeping a trial.
    """
    max_steps = int(hyperparameters["max_steps"])
    return math.ceil(float(hyperparameters.get("warmup_ratio") or 0.0) * max_steps) < step < max_steps


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
