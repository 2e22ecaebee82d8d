"""The service's TPE is set for studies of tens of trials: it searches near the best soon after its start-up."""

from __future__ import annotations

import math
import warnings

import optuna

from server.optuna_study import make_sampler


def _objective(trial: optuna.Trial) -> float:
    # Best at a learning rate of 10**-2.5 with a 0.1 warm-up, on the scales a study searches.
    learning_rate = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
    warmup_ratio = trial.suggest_float("warmup_ratio", 0.0, 0.3)
    return (math.log10(learning_rate) + 2.5) ** 2 + 4 * (warmup_ratio - 0.1) ** 2


def _late_trials_near_the_best(sampler_name: str, seed: int) -> int:
    """Of a 20-trial study's last 10 trials, how many have a learning rate within half a decade of the best."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument would warn in every study's log
        sampler = make_sampler({"sampler": sampler_name, "seed": seed}, 20, 1)
    study = optuna.create_study(sampler=sampler)
    study.optimize(_objective, n_trials=20)
    return sum(abs(math.log10(t.params["learning_rate"]) + 2.5) < 0.5 for t in study.trials[10:])


def test_tpe_for_a_20_trial_study_searches_near_the_best_after_its_start_up() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe = [_late_trials_near_the_best("tpe", seed) for seed in range(5)]
    random = [_late_trials_near_the_best("random", seed) for seed in range(5)]
    # Random search puts a quarter there. Optuna's own TPE settings (10% of trials taken as the good
    # ones: 2 of 20) put 3 to 7 of 10 there on these seeds; the service's put 6 to 9.
    assert min(tpe) >= 6, tpe
    assert sum(tpe) > 2 * sum(random), (tpe, random)
