"""tune_hyperparameters: real studies, real trial jobs (child processes), a real Optuna storage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import optuna
import pytest
import yaml
from mcp import Client
from sqlalchemy import Engine
from sqlmodel import Session, select

from server.admission.train import TrainRequest, build_train_job
from server.api.mcp import build_mcp_server
from server.context import ServiceContext, ServiceRef
from server.errors import InvalidRequest, LimitExceeded
from server.service import open_service
from server.settings import Settings
from server.store import agents as auth
from server.store import jobs
from server.store.db import make_engine, migrate
from server.store.tables import Agent, EvalReport, Job, JobState, Reservation
from server.tuning import kpi_objective
from server.tuning.admission import Strategy, final_retrain_request, resolve_strategy
from server.tuning.optuna_study import open_study
from tests import postgres
from tests.conftest import chat_records, quick_hyperparameters, serve_process, wait_until, write_jsonl
from tests.server.api.test_mcp_in_memory import call, wait_final
from tests.server.evaluation.test_eval import eval_records
from tools.create_eval_suite import CreateEvalSuiteRequest, create_eval_suite
from tools.get_quota import GetQuotaRequest, get_quota
from tools.tune_hyperparameters import TuneHyperparametersRequest, tune_hyperparameters
from tools.upload_dataset import UploadDatasetRequest, upload_dataset
from tools.views import job_view

FINAL = (JobState.succeeded, JobState.failed, JobState.cancelled)
ROOT = Path(__file__).resolve().parents[3]


def _dataset(ctx: ServiceContext, agent: Agent, tmp_path: Path) -> str:
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))
    return upload_dataset(ctx, agent, UploadDatasetRequest(path=str(path))).dataset.id


def _template(ctx: ServiceContext, dataset: str, **hyper: Any) -> dict[str, Any]:
    return {"base_model": str(ctx.settings.data_roots[1] / "tiny"), "datasets": [dataset], "adapter": "full",
            "hyperparameters": quick_hyperparameters(**{"save_steps": 1000, **hyper})}


def _start(ctx: ServiceContext, agent: Agent, **request: Any) -> str:
    return tune_hyperparameters(ctx, agent, TuneHyperparametersRequest.model_validate(request)).study_id


def _final(ctx: ServiceContext, agent: Agent, job_id: str, timeout: float = 300) -> Job:
    return wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, job_id)).state in FINAL and j, timeout=timeout)


def _trial_jobs(ctx: ServiceContext, study_id: str) -> list[Job]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(Job).where(Job.study_job_id == study_id)))


def _reservation(ctx: ServiceContext, job_id: str) -> Reservation:
    with Session(ctx.engine) as session:
        return session.exec(select(Reservation).where(Reservation.job_id == job_id)).one()


LR = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


@pytest.mark.slow
def test_study_finishes_its_trials_names_the_best_and_charges_the_budget_once(
        service: ServiceContext, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            # The default budget: each trial's estimate, which now counts chat records in the model's
            # tokens, template and all (it was ~1.5x low: the study ran out after 2 of 4 trials), and the retrain's.
            started = await call(client, "tune_hyperparameters", template=_template(service, ds), search_space=LR,
                                 n_trials=4, strategy={"pruner": "none", "seed": 1}, final_retrain=True)
            assert started["state"] == "queued"
            assert 4 * started["trial_estimate_flops"] < started["budget_flops"] < 5.5 * started["trial_estimate_flops"]
            study = await wait_final(client, started["study_id"])
            models = await call(client, "list_models", limit=50)
            quota = await call(client, "get_quota")
            return study, models, quota

    study, models, quota = anyio.run(main)
    assert study["state"] == "succeeded", study["error"]
    result = study["metrics"]
    trials = result["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and {t["state"] for t in trials} == {"complete"}
    assert result["importances"] == {"learning_rate": 1.0}  # four complete trials: enough to rank
    assert result["stopped_reason"] == "n_trials"
    assert result["best_value"] == min(t["value"] for t in trials)
    best = next(t for t in trials if t["number"] == result["best_trial"])
    assert result["best_params"] == best["params"] and result["best_job_id"] == best["job_id"]
    assert result["best_model_id"] in {m["id"] for m in models["models"]}
    # The last step retrained the best parameters on all the data: that model is the study's.
    retrain = next(j for j in _trial_jobs(service, study["id"]) if j.trial_number is None)
    assert retrain.state == JobState.succeeded and retrain.resolved["hyperparameters"]["eval_fraction"] == 0
    assert retrain.resolved["hyperparameters"]["learning_rate"] == pytest.approx(best["params"]["learning_rate"])
    assert study["model_id"] == result["final_model_id"] == retrain.model_id
    trial_jobs = [j for j in _trial_jobs(service, study["id"]) if j.trial_number is not None]
    assert sorted(j.trial_number for j in trial_jobs) == [0, 1, 2, 3]
    assert all(j.kind == "train" and j.state == JobState.succeeded and j.attempts == 1 for j in trial_jobs)
    for job in trial_jobs:  # each ran with its own sampled learning rate
        trial = next(t for t in trials if t["job_id"] == job.id)
        assert job.resolved["hyperparameters"]["learning_rate"] == pytest.approx(trial["params"]["learning_rate"])
    # The agent is charged the study's use once: its trials' reservations are carved out of it.
    used = sum(j.flops_used for j in trial_jobs) + retrain.flops_used
    assert study["flops_used"] == pytest.approx(used) and _reservation(service, study["id"]).flops_used == used
    assert quota["budget_flops_spent"] == pytest.approx(used)
    for job in [*trial_jobs, retrain]:  # priced at what it trains on, within a few percent above
        assert job.flops_used <= job.estimate_flops < 1.1 * job.flops_used
    stored = optuna.load_study(study_name=study["id"], storage=service.settings.studies_url)
    assert stored.best_trial.number == result["best_trial"]


def test_malformed_search_space_is_refused_naming_each_parameter_and_starts_nothing(
        service: ServiceContext, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))

    async def main() -> None:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            ds = (await call(client, "upload_dataset", path=str(data)))["dataset"]["id"]
            template = _template(service, ds)
            bad = {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01},
                   "lora.rank": {"type": "int", "low": 4, "high": 16},
                   "warmup_ratio": {"type": "float", "low": 0.0, "high": 2.0},
                   "weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": True},
                   "lr_scheduler": {"type": "categorical", "choices": []},
                   "eval_fraction": {"type": "float", "low": 0.0, "high": 0.2}}
            result = await client.call_tool("tune_hyperparameters", {"template": template, "search_space": bad})
            text = result.content[0].text
            assert result.is_error
            for problem in ("search_space.learning_rate: low (0.1) must be below high (0.01)",
                            "search_space.lora.rank: unknown parameter",
                            "search_space.warmup_ratio: 2.0 is not a valid warmup_ratio",
                            "search_space.weight_decay: log scale needs low > 0",
                            "search_space.lr_scheduler: a categorical parameter takes a non-empty `choices`",
                            "search_space.eval_fraction: the objective is the loss on the held-out split"):
                assert problem in text, text
            wrong_type = await client.call_tool("tune_hyperparameters", {
                "template": template, "search_space": {"learning_rate": {"type": "uniform", "low": 1, "high": 2}}})
            assert wrong_type.is_error and "search_space.learning_rate.type" in wrong_type.content[0].text
            bad_template = await client.call_tool("tune_hyperparameters", {
                "template": {**template, "hyperparameters": {"eval_fraction": 0}}, "search_space": LR})
            assert bad_template.is_error and "template.hyperparameters.eval_fraction" in bad_template.content[0].text
            assert (await call(client, "list_jobs"))["jobs"] == []

    anyio.run(main)
    assert optuna.get_all_study_summaries(service.settings.studies_url) == []


def test_study_over_the_agents_budget_or_job_limit_is_refused(service: ServiceContext, tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "frugal", budget_flops=1e10,
                                 max_concurrent_jobs=3)
    template = _template(service, _dataset(service, agent, tmp_path))
    with pytest.raises(LimitExceeded, match="budget_flops <= ") as refused:
        _start(service, agent, template=template, search_space=LR, n_trials=20)
    assert refused.value.param == "budget_flops"
    with pytest.raises(LimitExceeded, match="n_parallel <= 2 fits"):
        _start(service, agent, template=template, search_space=LR, n_trials=1, n_parallel=3)
    with pytest.raises(InvalidRequest, match="does not pay for one trial"):
        _start(service, agent, template=template, search_space=LR, budget_flops=1e6)
    assert jobs.list_for_agent(service.engine, agent.id) == []


def test_small_budget_stops_the_study_early_with_a_clear_result(service: ServiceContext, tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "thrifty")
    template = _template(service, _dataset(service, agent, tmp_path))
    trial = build_train_job(service, agent, TrainRequest.model_validate(template)).estimate
    budget = 1.5 * trial.flops  # one trial and a half: the second cannot be paid for
    request = {"template": template, "search_space": LR, "n_trials": 6, "budget_flops": budget,
               "strategy": {"pruner": "none"}, "idempotency_key": "small"}
    study_id = _start(service, agent, **request)
    study = _final(service, agent, study_id)
    assert study.state == JobState.succeeded, study.error
    assert study.metrics["stopped_reason"] == "budget_spent"
    assert len(study.metrics["trials"]) == 1 and study.metrics["trials"][0]["state"] == "complete"
    assert study.flops_used <= budget and _reservation(service, study_id).flops_used == study.flops_used
    assert get_quota(service, agent, GetQuotaRequest()).budget_flops_spent == pytest.approx(study.flops_used)
    assert _start(service, agent, **request) == study_id  # a retry with the same key: the same study


def test_cancelling_a_study_cancels_its_running_trial_and_settles_once(service: ServiceContext,
                                                                      tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "impatient")
    template = _template(service, _dataset(service, agent, tmp_path), max_steps=100000)
    study_id = _start(service, agent, template=template, search_space=LR, n_trials=3, budget_flops=1e15,
                      strategy={"pruner": "none"})
    wait_until(lambda: any(j.state == JobState.running and j.progress.get("step")
                           for j in _trial_jobs(service, study_id)),
               timeout=120, interval=0.1)
    jobs.request_cancel(service.engine, agent.id, study_id)
    study = _final(service, agent, study_id, timeout=120)
    assert study.state == JobState.cancelled and study.metrics["stopped_reason"] == "cancelled"
    [trial] = _trial_jobs(service, study_id)
    assert trial.state == JobState.cancelled and not trial.metrics.get("pruned")
    assert _reservation(service, study_id).flops_used == study.flops_used == trial.flops_used > 0
    assert study.metrics["trials"][0]["state"] == "fail"
    assert get_quota(service, agent, GetQuotaRequest()).budget_flops_spent == pytest.approx(study.flops_used)


def test_a_study_whose_studies_database_moved_fails_naming_the_setting_and_starts_nothing(
        settings: Settings, tmp_path: Path) -> None:
    with open_service(settings, workers=False) as ctx:
        agent = auth.ensure_local_agent(ctx.engine, settings)
        study_id = _start(ctx, agent, template=_template(ctx, _dataset(ctx, agent, tmp_path)), search_space=LR,
                          n_trials=2, budget_flops=1e12)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with open_service(settings.model_copy(update={"studies_database_url": elsewhere})) as ctx:
        study = _final(ctx, agent, study_id, timeout=60)
        assert _trial_jobs(ctx, study_id) == []
    assert study.state == JobState.failed and study.error is not None
    assert (study.error["code"], study.error["param"]) == ("studies_database_moved", "studies_database_url")
    assert f"is in the studies database {settings.studies_url}, but the service's is now {elsewhere}" \
        in study.error["message"]
    assert optuna.get_all_study_summaries(elsewhere) == []  # no second study was begun there


@pytest.mark.slow
def test_hyperband_prunes_trials_whose_learning_rate_is_hopeless(service: ServiceContext, tmp_path: Path) -> None:
    agent = auth.ensure_local_agent(service.engine, service.settings)
    steps = 120
    template = _template(service, _dataset(service, agent, tmp_path), max_steps=steps)
    # eval_steps of half the run: a single Hyperband bracket, so each trial is compared with every
    # earlier one at step 60, and one behind the best there is pruned.
    study_id = _start(service, agent, template=template, n_trials=5, budget_flops=1e13,
                      search_space={"learning_rate": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}},
                      strategy={"sampler": "random", "seed": 3, "eval_steps": steps // 2})
    study = _final(service, agent, study_id, timeout=400)
    assert study.state == JobState.succeeded, study.error
    pruned = [t for t in study.metrics["trials"] if t["state"] == "pruned"]
    assert pruned, study.metrics["trials"]
    by_id = {j.id: j for j in _trial_jobs(service, study_id)}
    complete_flops = min(t["flops_used"] for t in study.metrics["trials"] if t["state"] == "complete")
    for trial in pruned:
        job = by_id[trial["job_id"]]
        assert job.state == JobState.cancelled and job.metrics["pruned"] is True
        assert job.progress["step"] < steps and job.flops_used < complete_flops
        reservation = _reservation(service, job.id)  # settled at what it used: the rest went back to the study
        # (not necessarily under what was reserved: chat trials use more than the estimate; see the README)
        assert reservation.settled_at is not None and reservation.flops_used == job.flops_used
    assert study.metrics["trials_pruned"] == len(pruned)


@pytest.mark.slow
def test_restart_mid_study_loses_no_trial_and_runs_none_twice(settings: Settings, tmp_path: Path) -> None:
    with open_service(settings) as ctx:
        agent = auth.ensure_local_agent(ctx.engine, settings)
        template = _template(ctx, _dataset(ctx, agent, tmp_path), max_steps=60, save_steps=10)
        study_id = _start(ctx, agent, template=template, search_space=LR, n_trials=3, budget_flops=1e13,
                          strategy={"pruner": "none", "seed": 2})

        def second_trial_running() -> bool:
            return any(j.trial_number == 1 and j.state == JobState.running and j.progress.get("step")
                       for j in _trial_jobs(ctx, study_id))

        wait_until(second_trial_running, timeout=240, interval=0.1)
    # The service is down. A driver that had asked Optuna for a trial and died before inserting its
    # job leaves a running trial with no job; the next driver must not lose the study over it.
    with open_service(settings, workers=False) as ctx:
        orphan = open_study(jobs.get(ctx.engine, agent.id, study_id), settings.studies_url).ask().number
    with open_service(settings) as ctx:
        study = _final(ctx, agent, study_id, timeout=400)
        trial_jobs = _trial_jobs(ctx, study_id)
    assert study.state == JobState.succeeded, study.error
    assert study.attempts == 2
    numbers = sorted(j.trial_number for j in trial_jobs)
    assert len(numbers) == 3 and len(set(numbers)) == 3 and orphan not in numbers
    assert all(j.state == JobState.succeeded for j in trial_jobs)
    resumed = next(j for j in trial_jobs if j.trial_number == 1)
    assert resumed.attempts == 2  # the same job went on from its checkpoint; no second job for trial 1
    assert next(j for j in trial_jobs if j.trial_number == 0).attempts == 1
    assert [t["number"] for t in study.metrics["trials"]] == numbers
    states = {t.number: t.state for t in optuna.load_study(study_name=study_id, storage=settings.studies_url).trials}
    assert states[orphan] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 3


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps yet counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _training_pids(engine: Engine, agent_id: str, job_id: str) -> list[int]:
    return [int(e.data["process"]) for e in jobs.events(engine, agent_id, job_id, 0, 2000, ("message",))
            if e.message.startswith("training process")]


@pytest.mark.slow
def test_a_sigkilled_service_resumes_its_study_losing_and_repeating_no_trial(settings: Settings,
                                                                              tmp_path: Path) -> None:
    engine = make_engine(settings.db_url)
    migrate(engine)
    ctx = ServiceContext(settings=settings, engine=engine, executor=None)  # this process only reads the store
    agent, key = auth.create_agent(engine, settings, "crash-test")
    headers = {"Authorization": f"Bearer {key}"}
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(48))
    log = tmp_path / "serve.log"
    service, base = serve_process(settings, log)
    replacement = None
    try:
        dataset = httpx.post(f"{base}/v1/datasets", json={"path": str(data)}, headers=headers, timeout=60).json()
        template = {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [dataset["dataset"]["id"]],
                    "adapter": "full", "hyperparameters": quick_hyperparameters(max_steps=60, save_steps=20)}
        started = httpx.post(f"{base}/v1/studies", headers=headers, timeout=60, json={
            "template": template, "search_space": LR, "n_trials": 3, "n_parallel": 1, "budget_flops": 1e13,
            "strategy": {"pruner": "none", "seed": 5}})
        assert started.status_code == 200, started.text
        study_id = started.json()["study_id"]

        def second_trial_checkpointed() -> tuple[Job, int] | None:
            second = next((j for j in _trial_jobs(ctx, study_id) if j.trial_number == 1), None)
            saved = jobs.checkpoints(engine, second.id) if second is not None else []
            return (second, saved[-1].step) if second is not None and saved else None

        # Trial 0 done, trial 1 part-way with a checkpoint: kill the service outright.
        interrupted, checkpoint_step = wait_until(second_trial_checkpointed, timeout=240, interval=0.05)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        # Its training child sees its worker gone and exits, so no orphan trains on beside the next run.
        [child] = _training_pids(engine, agent.id, interrupted.id)
        wait_until(lambda: _gone(child), timeout=10, interval=0.1)

        replacement, base = serve_process(settings, log)
        study = wait_until(lambda: (j := jobs.get(engine, agent.id, study_id)).state in FINAL and j, timeout=240)
        quota = httpx.get(f"{base}/v1/quota", headers=headers, timeout=30).json()
    finally:
        for proc in (service, replacement):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    assert study.state == JobState.succeeded, (study.error, log.read_text(encoding="utf-8")[-3000:])
    assert study.attempts == 2  # the new service's driver took the study over once

    # Exactly n_trials trials, one train job each, each Optuna trial number on exactly one job.
    trial_jobs = _trial_jobs(ctx, study_id)
    by_number = {j.trial_number: j for j in trial_jobs}
    assert sorted(by_number) == [0, 1, 2] and len(trial_jobs) == 3
    assert all(j.kind == "train" and j.state == JobState.succeeded for j in trial_jobs)
    optuna_trials = optuna.load_study(study_name=study_id, storage=settings.studies_url).trials
    complete = [t.number for t in optuna_trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == [0, 1, 2]
    # A trial asked but never given a job (a kill between the two) is told FAIL, never run.
    assert all(t.state == optuna.trial.TrialState.FAIL for t in optuna_trials if t.number not in by_number)
    assert [t["number"] for t in study.metrics["trials"]] == [0, 1, 2]
    assert {t["state"] for t in study.metrics["trials"]} == {"complete"}

    # The interrupted trial went on as the same job from its checkpoint: two runs, the second resumed.
    resumed = by_number[1]
    assert resumed.id == interrupted.id and resumed.attempts == 2
    assert len(_training_pids(engine, agent.id, resumed.id)) == 2
    messages = [e.message for e in jobs.events(engine, agent.id, resumed.id, 0, 2000, ("message",))]
    resumed_from = [int(m.split()[-1]) for m in messages if m.startswith("resuming from step")]
    assert resumed_from and resumed_from[0] >= checkpoint_step, messages
    for number in (0, 2):
        assert by_number[number].attempts == 1 and len(_training_pids(engine, agent.id, by_number[number].id)) == 1

    # Charged once: each trial's reservation settled at what it used, the study's at their sum, and
    # the agent's budget spent that much. The killed run's compute counts too: the interrupted trial
    # trained at least every step trial 0 did (the same batches in the same order).
    used = sum(j.flops_used for j in trial_jobs)
    for job in trial_jobs:
        reservation = _reservation(ctx, job.id)
        assert reservation.settled_at is not None and reservation.flops_used == job.flops_used
    study_reservation = _reservation(ctx, study_id)
    assert study_reservation.settled_at is not None and study_reservation.flops_used == study.flops_used
    assert study.flops_used == pytest.approx(used) and quota["budget_flops_spent"] == pytest.approx(used)
    assert resumed.flops_used >= by_number[0].flops_used * 0.999


@pytest.mark.slow
def test_a_study_runs_in_a_postgresql_store_and_the_agent_never_sees_its_password(
        settings: Settings, tmp_path: Path) -> None:
    bin_dir, reason = postgres.available_or_reason()
    if bin_dir is None:
        pytest.skip(reason)
    with postgres.postgres_server(bin_dir) as url:
        # The test server trusts every local connection, so any password gets in: the point is where it shows.
        with_password = url.replace("postgres@", "postgres:s3cret-pw@")
        store = settings.model_copy(update={"database_url": with_password})
        with open_service(store) as ctx:
            agent = auth.ensure_local_agent(ctx.engine, store)
            template = _template(ctx, _dataset(ctx, agent, tmp_path))
            study_id = _start(ctx, agent, template=template, search_space=LR, n_trials=2, budget_flops=1e12,
                              strategy={"pruner": "none"})
            study = _final(ctx, agent, study_id)
            view = job_view(study).model_dump_json()
        assert study.state == JobState.succeeded, study.error
        stored = optuna.load_study(study_name=study_id, storage=url)  # the service's own database
        assert [t.state for t in stored.trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert "s3cret-pw" not in view and "optuna-dashboard postgresql+psycopg://postgres:***@" in view
        assert "s3cret-pw" not in json.dumps(study.resolved)  # nor does the job row hold it


@pytest.mark.slow
def test_cli_tune_starts_a_study_from_yaml_and_shows_its_trials(
        http_service, settings: Settings, tmp_path: Path) -> None:
    base, key, _ = http_service
    env = {**os.environ, "WEIGHTSMITH_URL": base, "WEIGHTSMITH_API_KEY": key, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "server.cli.main"]
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    uploaded = subprocess.run([*cli, "datasets", "upload", str(data), "--json"], env=env, capture_output=True,
                              text=True, check=True)
    dataset_id = json.loads(uploaded.stdout)["dataset"]["id"]
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "template": {"base_model": str(settings.data_roots[1] / "tiny"), "datasets": [dataset_id],
                     "hyperparameters": quick_hyperparameters(save_steps=100)},
        "search_space": LR, "n_trials": 2, "budget_flops": 1e12, "strategy": {"pruner": "none"}}),
        encoding="utf-8")
    tuned = subprocess.run([*cli, "tune", "--config", str(study), "--watch"], env=env, capture_output=True,
                           text=True, check=False, timeout=400)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert "succeeded" in tuned.stdout and "best" in tuned.stdout and "stopped: n_trials" in tuned.stdout
    assert tuned.stdout.count("complete") >= 2
    started = re.search(r"(job_\w+) queued: budget", tuned.stdout)
    assert started, tuned.stdout
    study_id = started.group(1)
    shown = httpx.get(f"{base}/v1/jobs/{study_id}", headers={"Authorization": f"Bearer {key}"}).json()
    # What the study hands over, last: no final retrain was asked for, so the best trial's model.
    assert f"model {shown['model_id']} (trial {shown['metrics']['best_trial']}); best parameters" in tuned.stdout
    refused = subprocess.run([*cli, "tune", "--config", str(study)], env={**env, "WEIGHTSMITH_API_KEY": "nope"},
                             capture_output=True, text=True, check=False)
    # A key the service does not know: one line naming what to set, exit code 2 as for any missing set-up.
    assert refused.returncode == 2 and "WEIGHTSMITH_API_KEY" in refused.stderr


# The eval-suite KPI objective: a small suite (12 items, 4 new tokens) keeps each trial's eval short.
KPI_SUITE = """
name: facts-kpi
dataset: {dataset}
decoding: {{max_new_tokens: 4, batch_size: 8}}
kpis:
  - {{name: exact, grader: {{type: exact, ignore_case: true}}}}
  - {{name: ppl, grader: {{type: perplexity}}, direction: lower}}
"""


def _kpi_suite(ctx: ServiceContext, agent: Agent, tmp_path: Path, definition: str = KPI_SUITE) -> str:
    items = write_jsonl(tmp_path / f"items-{agent.id}.jsonl", eval_records(12))
    dataset = upload_dataset(ctx, agent, UploadDatasetRequest(path=str(items))).dataset.id
    return create_eval_suite(ctx, agent, CreateEvalSuiteRequest(definition=definition.format(dataset=dataset))).id


def _study_reservations(ctx: ServiceContext, study_id: str) -> list[Reservation]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(Reservation).where(Reservation.within_job_id == study_id)))


def test_a_slow_step_of_the_study_driver_keeps_its_lease(service: ServiceContext, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Queueing a trial hashes its dataset snapshots, seconds for a multi-GB file: here, twice the lease.
    # Renewed only between steps of its loop, the lease expired and the service took the study over again.
    from server.admission import snapshots

    def slow_queue(*args: Any, **kwargs: Any) -> None:
        time.sleep(2 * service.settings.lease_seconds)
        real_queue(*args, **kwargs)

    real_queue = snapshots.queue_after_check
    monkeypatch.setattr(snapshots, "queue_after_check", slow_queue)
    agent = auth.ensure_local_agent(service.engine, service.settings)
    template = _template(service, _dataset(service, agent, tmp_path), max_steps=2)
    study_id = _start(service, agent, template=template, search_space=LR, n_trials=1, budget_flops=1e12,
                      strategy={"pruner": "none"})
    study = _final(service, agent, study_id)
    assert study.state == JobState.succeeded, study.error
    assert study.attempts == 1 and study.lease_epoch == 1  # one driver, never taken over


def test_kpi_objective_is_checked_at_admission_naming_the_field_and_starts_nothing(
        service: ServiceContext, tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "kpi-tuner", budget_flops=1e6)
    other, _ = auth.create_agent(service.engine, service.settings, "kpi-other")
    template = _template(service, _dataset(service, agent, tmp_path))
    suite_id = _kpi_suite(service, agent, tmp_path)
    others_suite = _kpi_suite(service, other, tmp_path)
    lower_only = _kpi_suite(service, agent, tmp_path, KPI_SUITE.replace("facts-kpi", "ppl-only").replace(
        "  - {{name: exact, grader: {{type: exact, ignore_case: true}}}}\n", ""))
    refusals = [
        ({"objective": "kpi:nosuch/ppl"}, "strategy.objective",
         f"their KPIs: ppl-only ({lower_only}): ppl; facts-kpi ({suite_id}): exact, ppl"),
        ({"objective": "kpi:facts-kpi/accuracy"}, "strategy.objective", "its KPIs: exact, ppl; or its composite"),
        ({"objective": f"kpi:{others_suite}/ppl"}, "strategy.objective", f"no eval suite '{others_suite}' of yours"),
        ({"objective": "kpi:facts-kpi/accuracy"}, "strategy.objective", "has no KPI 'accuracy'; its KPIs: exact, ppl"),
        ({"objective": "kpi:ppl"}, "strategy.objective", "is not kpi:SUITE/KPI"),
        ({"objective": "kpi:facts-kpi/ppl", "direction": "maximize"}, "strategy.direction",
         "KPI ppl of suite facts-kpi is minimized"),
        ({"objective": f"kpi:{suite_id}/exact", "pruner": "median"}, "strategy.pruner",
         "pruner median would compare the trials' held-out losses, which are not the KPI exact"),
        ({"direction": "maximize"}, "strategy.direction", "eval_loss is a loss: it is minimized"),
        ({"objective": "kpi:facts-kpi/composite", "direction": "minimize"}, "strategy.direction",
         "the composite of suite facts-kpi is a score, maximized"),
        ({"objective": f"kpi:{lower_only}/composite"}, "strategy.objective",
         "has no composite: no formula, and none of its KPIs (ppl) is one where higher is better"),
    ]
    for strategy, field, says in refusals:
        with pytest.raises(InvalidRequest, match=re.escape(says)) as refused:
            _start(service, agent, template=template, search_space=LR, strategy=strategy)
        assert refused.value.param == field, (strategy, refused.value)
    with pytest.raises(InvalidRequest, match=re.escape(f'strategy.objective "kpi:{suite_id}/<KPI>"')) as refused:
        _start(service, agent, template={**template, "eval_suite": suite_id}, search_space=LR)
    assert refused.value.param == "template.eval_suite"
    # A trial is priced with its eval: the default budget is n_trials of both, and no budget pays for less.
    trial = build_train_job(service, agent, TrainRequest.model_validate(template)).estimate
    evaluation = kpi_objective.eval_price(service.engine, suite_id, trial.parameters).flops
    objective = {"objective": "kpi:facts-kpi/ppl"}
    with pytest.raises(LimitExceeded, match=re.escape(f"the study's budget of {3 * (trial.flops + evaluation):.3g} "
                                                      "FLOPs is over what is left of your budget")):
        _start(service, agent, template=template, search_space=LR, n_trials=3, strategy=objective)
    # A final retrain is priced with its eval. Trials that held nothing out need none: the best trained on
    # all the data already.
    retrain = build_train_job(service, agent, final_retrain_request(TrainRequest.model_validate(
        template), {})).estimate
    with pytest.raises(LimitExceeded, match=re.escape(
            f"the study's budget of {3 * (trial.flops + evaluation) + retrain.flops + evaluation:.3g} FLOPs")):
        _start(service, agent, template=template, search_space=LR, n_trials=3, strategy=objective, final_retrain=True)
    whole = {**template, "hyperparameters": {**template["hyperparameters"], "eval_fraction": 0.0}}
    whole_trial = build_train_job(service, agent, TrainRequest.model_validate(whole)).estimate
    with pytest.raises(LimitExceeded, match=re.escape(
            f"the study's budget of {3 * (whole_trial.flops + evaluation):.3g} FLOPs")):
        _start(service, agent, template=whole, search_space=LR, n_trials=3, strategy=objective, final_retrain=True)
    with pytest.raises(InvalidRequest, match=re.escape(f"and {evaluation:.3g} for its eval")) as refused:
        _start(service, agent, template=template, search_space=LR, strategy=objective,
               budget_flops=trial.flops + evaluation / 2)
    assert refused.value.param == "budget_flops"
    assert jobs.list_for_agent(service.engine, agent.id) == []
    assert optuna.get_all_study_summaries(service.settings.studies_url) == []
    # Left out, the direction and the pruner follow the objective; what the study stores is explicit.
    request = TrainRequest.model_validate(template)
    with Session(service.engine) as session:
        exact, kpi = resolve_strategy(session, agent, Strategy(objective="kpi:facts-kpi/exact"), request)
        loss, no_kpi = resolve_strategy(session, agent, Strategy(), request)
        composite, _ = resolve_strategy(session, agent, Strategy(objective="kpi:facts-kpi/composite"), request)
    assert kpi is not None and kpi.suite_id == suite_id and no_kpi is None
    assert (exact["objective"], exact["direction"], exact["pruner"]) == (f"kpi:{suite_id}/exact", "maximize", "none")
    assert (composite["objective"], composite["direction"]) == (f"kpi:{suite_id}/composite", "maximize")
    assert (loss["objective"], loss["direction"], loss["pruner"]) == ("eval_loss", "minimize", "hyperband")


@pytest.mark.slow
def test_kpi_study_evaluates_every_trial_and_picks_the_best_kpi_within_one_budget(
        service: ServiceContext, tmp_path: Path) -> None:
    agent = auth.ensure_local_agent(service.engine, service.settings)
    suite_id = _kpi_suite(service, agent, tmp_path)
    # No held-out split: a KPI objective is measured on the suite, not on held-out training records.
    template = _template(service, _dataset(service, agent, tmp_path), eval_fraction=0.0)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Client(build_mcp_server(ServiceRef(service))) as client:
            started = await call(client, "tune_hyperparameters", template=template, search_space=LR, n_trials=2,
                                 budget_flops=1e12, strategy={"objective": "kpi:facts-kpi/ppl", "sampler": "random",
                                                              "seed": 4})
            return started, await wait_final(client, started["study_id"])

    started, study = anyio.run(main)
    assert study["state"] == "succeeded", study["error"]
    result = study["metrics"]
    assert result["objective"] == f"kpi:{suite_id}/ppl" and result["direction"] == "minimize"
    assert study["method"] == "random+none" and result["trials_pruned"] == 0
    rows = _trial_jobs(service, study["id"])
    trains = {j.trial_number: j for j in rows if j.kind == "train"}
    evals = {j.trial_number: j for j in rows if j.kind == "eval"}
    assert sorted(trains) == sorted(evals) == [0, 1] and len(rows) == 4
    # Each eval was reserved at the price the study was admitted with.
    eval_price = kpi_objective.eval_price(service.engine, suite_id, trains[0].resolved["estimate"]["parameters"])
    assert all(j.estimate_flops == eval_price.flops for j in evals.values())
    assert started["eval_estimate_flops"] == eval_price.flops
    told = {t.number: t.value for t in optuna.load_study(study_name=study["id"],
                                                          storage=service.settings.studies_url).trials}
    for trial in result["trials"]:
        train, evaluated = trains[trial["number"]], evals[trial["number"]]
        assert trial["state"] == "complete" and trial["eval_job_id"] == evaluated.id
        assert train.state == evaluated.state == JobState.succeeded
        with Session(service.engine) as session:
            report = session.exec(select(EvalReport).where(EvalReport.job_id == evaluated.id)).one()
        # The trial's own model, alone (a study compares trials, not a baseline), on the study's suite.
        assert report.model_id == train.model_id and report.suite_id == suite_id and report.baseline_ref is None
        ppl = next(k["value"] for k in report.summary["kpis"] if k["name"] == "ppl")
        assert trial["value"] == told[trial["number"]] == ppl
        assert trial["flops_used"] == pytest.approx(train.flops_used + evaluated.flops_used)
    values = [t["value"] for t in result["trials"]]
    assert len(set(values)) == 2  # distinct learning rates, distinct perplexities: the best is unambiguous
    assert result["best_value"] == min(values)  # ppl is declared lower-is-better
    best = next(t for t in result["trials"] if t["value"] == min(values))
    assert result["best_trial"] == best["number"] and result["best_model_id"] == trains[best["number"]].model_id
    # Trials and evals are carved out of the study's reservation; the agent is charged once, at their use.
    used = sum(j.flops_used for j in rows)
    carved = _study_reservations(service, study["id"])
    assert {r.job_id for r in carved} == {j.id for j in rows}
    assert all(r.settled_at is not None and r.flops_used == next(j for j in rows if j.id == r.job_id).flops_used
               for r in carved)
    assert study["flops_used"] == pytest.approx(used) and _reservation(service, study["id"]).flops_used == used
    assert get_quota(service, agent, GetQuotaRequest()).budget_flops_spent == pytest.approx(used)


def _finished_kpi_study_with_final_retrain(ctx: ServiceContext, tmp_path: Path, kpi: str, eval_fraction: float,
                                           suite: str = KPI_SUITE) -> tuple[Agent, str, Job]:
    """A 2-trial random study of suite facts-kpi's `kpi`, asking for a final retrain, run to success."""
    agent = auth.ensure_local_agent(ctx.engine, ctx.settings)
    suite_id = _kpi_suite(ctx, agent, tmp_path, suite)
    template = _template(ctx, _dataset(ctx, agent, tmp_path), eval_fraction=eval_fraction, max_steps=4)
    study_id = _start(ctx, agent, template=template, search_space=LR, n_trials=2, final_retrain=True,
                      strategy={"objective": f"kpi:facts-kpi/{kpi}", "sampler": "random", "seed": 4})
    study = _final(ctx, agent, study_id)
    assert study.state == JobState.succeeded, study.error
    return agent, suite_id, study


@pytest.mark.slow
def test_a_kpi_study_can_maximize_its_suites_composite(service: ServiceContext, tmp_path: Path) -> None:
    agent, suite_id, study = _finished_kpi_study_with_final_retrain(
        service, tmp_path, "composite", eval_fraction=0.0, suite=KPI_SUITE + 'composite: "exact + 1 / ppl"\n')
    study_id, result = study.id, study.metrics
    # The trials held nothing out, so the best of them is the final model: no retrain of the same data.
    assert all(j.trial_number is not None for j in _trial_jobs(service, study_id))
    assert (result["final_job_id"], result["final_model_id"]) == (result["best_job_id"], result["best_model_id"])
    assert study.model_id == result["best_model_id"]
    messages = [e.message for e in jobs.events(service.engine, agent.id, study_id, 0, 500)]
    assert any(m.startswith("no final retrain: the trials held nothing out") for m in messages), messages
    assert (result["objective"], result["direction"]) == (f"kpi:{suite_id}/composite", "maximize")
    for trial in result["trials"]:
        with Session(service.engine) as session:
            report = session.exec(select(EvalReport).where(EvalReport.job_id == trial["eval_job_id"])).one()
        kpis = {row["name"]: row["value"] for row in report.summary["kpis"]}
        assert trial["value"] == report.summary["composite"] == pytest.approx(kpis["exact"] + 1 / kpis["ppl"])
    assert result["best_value"] == max(t["value"] for t in result["trials"])


@pytest.mark.slow
def test_a_kpi_studys_final_retrain_is_evaluated_on_its_suite_within_the_default_budget(
        service: ServiceContext, tmp_path: Path) -> None:
    # Trials hold a quarter out; the retrain trains on all of it, so its model is not any trial's.
    agent, suite_id, study = _finished_kpi_study_with_final_retrain(service, tmp_path, "ppl", eval_fraction=0.25)
    result = study.metrics
    rows = _trial_jobs(service, study.id)
    retrain, final_eval = ([j for j in rows if j.kind == kind and j.trial_number is None] for kind in ("train", "eval"))
    assert len(retrain) == len(final_eval) == 1 and len(rows) == 6  # 2 trials, 2 evals, the retrain and its eval
    retrain, final_eval = retrain[0], final_eval[0]
    assert (result["final_job_id"], result["final_model_id"]) == (retrain.id, retrain.model_id)
    assert study.model_id == retrain.model_id and result["final_eval_job_id"] == final_eval.id
    assert final_eval.state == JobState.succeeded, final_eval.error
    with Session(service.engine) as session:
        report = session.exec(select(EvalReport).where(EvalReport.job_id == final_eval.id)).one()
    assert report.model_id == retrain.model_id and report.suite_id == suite_id and report.baseline_ref is None
    assert result["final_value"] == next(k["value"] for k in report.summary["kpis"] if k["name"] == "ppl")
    # The default budget paid for every trial, the retrain and its eval; the agent is charged once.
    assert result["stopped_reason"] == "n_trials"
    used = sum(j.flops_used for j in rows)
    assert study.flops_used == pytest.approx(used) and used <= study.estimate_flops
    assert get_quota(service, agent, GetQuotaRequest()).budget_flops_spent == pytest.approx(used)


def test_a_failed_trial_eval_fails_the_trial_with_its_reason_and_settles_what_it_used(
        service: ServiceContext, tmp_path: Path) -> None:
    agent = auth.ensure_local_agent(service.engine, service.settings)
    # The facts' answers are no tool calls, so the tool_call grader fails every eval job it runs in.
    broken = KPI_SUITE + "  - {{name: calls, grader: {{type: tool_call}}}}\n"
    suite_id = _kpi_suite(service, agent, tmp_path, broken)
    template = _template(service, _dataset(service, agent, tmp_path), max_steps=2)
    study_id = _start(service, agent, template=template, search_space=LR, n_trials=1, budget_flops=1e12,
                      strategy={"objective": f"kpi:{suite_id}/ppl"})
    study = _final(service, agent, study_id)
    assert study.state == JobState.failed and study.error["code"] == "no_trial_completed"
    [train, evaluated] = sorted(_trial_jobs(service, study_id), key=lambda j: j.kind, reverse=True)
    assert train.kind == "train" and train.state == JobState.succeeded
    assert evaluated.kind == "eval" and evaluated.trial_number == 0 and evaluated.state == JobState.failed
    [trial] = study.metrics["trials"]
    assert trial["state"] == "fail" and trial["value"] is None and trial["eval_job_id"] == evaluated.id
    said = [e.message for e in jobs.events(service.engine, agent.id, study_id, limit=100)]
    assert any(m.startswith(f"trial 0 failed: its eval job {evaluated.id} failed: KPI calls") for m in said), said
    assert optuna.load_study(study_name=study_id, storage=service.settings.studies_url).trials[0].state == \
        optuna.trial.TrialState.FAIL
    assert evaluated.flops_used > 0 and _reservation(service, evaluated.id).flops_used == evaluated.flops_used
    assert _reservation(service, study_id).flops_used == study.flops_used == train.flops_used + evaluated.flops_used


@pytest.mark.slow  # two service starts: 18-39 s on two shared cores
def test_restart_while_a_trial_is_evaluated_keeps_its_one_eval_job(settings: Settings, tmp_path: Path) -> None:
    with open_service(settings) as ctx:
        agent = auth.ensure_local_agent(ctx.engine, settings)
        suite_id = _kpi_suite(ctx, agent, tmp_path)
        template = _template(ctx, _dataset(ctx, agent, tmp_path), max_steps=2)
        study_id = _start(ctx, agent, template=template, search_space=LR, n_trials=1, budget_flops=1e12,
                          strategy={"objective": f"kpi:{suite_id}/exact"})
        wait_until(lambda: any(j.kind == "eval" for j in _trial_jobs(ctx, study_id)), timeout=240, interval=0.1)
    # The service stopped with the trial trained and its eval queued or running: the next driver must
    # follow that eval job, not start a second one.
    with open_service(settings) as ctx:
        study = _final(ctx, agent, study_id)
        rows = _trial_jobs(ctx, study_id)
        charged = _reservation(ctx, study_id).flops_used
    assert study.state == JobState.succeeded, study.error
    assert study.attempts == 2 and study.metrics["direction"] == "maximize"
    [train] = [j for j in rows if j.kind == "train"]
    [evaluated] = [j for j in rows if j.kind == "eval"]
    assert train.attempts == 1 and evaluated.state == JobState.succeeded
    [trial] = study.metrics["trials"]
    assert trial["state"] == "complete" and trial["eval_job_id"] == evaluated.id
    assert trial["value"] == evaluated.metrics["kpi_exact"]
    assert charged == study.flops_used == train.flops_used + evaluated.flops_used


def test_a_trial_holds_its_slot_while_evaluated_and_cancelling_the_study_stops_its_eval(
        service: ServiceContext, tmp_path: Path) -> None:
    agent = auth.ensure_local_agent(service.engine, service.settings)
    suite_id = _kpi_suite(service, agent, tmp_path)
    template = _template(service, _dataset(service, agent, tmp_path), max_steps=2)
    study_id = _start(service, agent, template=template, search_space=LR, n_trials=2, budget_flops=1e12,
                      strategy={"objective": f"kpi:{suite_id}/exact"})
    wait_until(lambda: any(j.kind == "eval" for j in _trial_jobs(service, study_id)), timeout=240, interval=0.1)
    jobs.request_cancel(service.engine, agent.id, study_id)
    study = _final(service, agent, study_id, timeout=120)
    assert study.state == JobState.cancelled and study.metrics["stopped_reason"] == "cancelled"
    rows = _trial_jobs(service, study_id)
    # n_parallel 1: the second trial waits for the first one's eval, so the cancel found it unstarted.
    assert sorted((j.kind, j.trial_number) for j in rows) == [("eval", 0), ("train", 0)]
    assert all(j.state in (JobState.succeeded, JobState.cancelled) for j in rows)
    [evaluated] = [j for j in rows if j.kind == "eval"]
    [trial] = study.metrics["trials"]  # cancelled while its eval ran, or told the value it finished with
    assert (trial["state"], evaluated.state) in (("fail", JobState.cancelled), ("complete", JobState.succeeded))
    assert _reservation(service, study_id).flops_used == study.flops_used == sum(j.flops_used for j in rows)
    assert get_quota(service, agent, GetQuotaRequest()).budget_flops_spent == pytest.approx(study.flops_used)
