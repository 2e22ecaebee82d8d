"""Admission: limits per request and per agent, race-free reservations, settlement once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from server.errors import LimitExceeded
from server.service import open_service
from server.settings import Settings
from server.store import agents as auth
from server.store import jobs
from server.store.tables import Job, JobState, Reservation
from tests import postgres
from tests.conftest import chat_records, quick_hyperparameters, wait_until, write_jsonl
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset
from training_core.token_counts import ModelTokens, record_tokens


def _request(tiny_model: Path, dataset_id: str, **overrides: object) -> LaunchTrainingRequest:
    return LaunchTrainingRequest.model_validate({
        "base_model": str(tiny_model), "datasets": [dataset_id], "adapter": "lora",
        "hyperparameters": quick_hyperparameters(), **overrides})


def _dataset(ctx, agent, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    return upload_dataset(ctx, agent, UploadDatasetRequest(path=str(path))).dataset.id


def _trained(ctx, agent, request: LaunchTrainingRequest) -> Job:  # type: ignore[no-untyped-def]
    """Launch the job and wait for it to succeed."""
    started = launch_training(ctx, agent, request)
    assert started.job is not None
    done = wait_until(lambda: (j := jobs.get(ctx.engine, agent.id, started.job.id)).state in
                      (JobState.succeeded, JobState.failed) and j)
    assert done.state == JobState.succeeded, done.error
    return done


def _race_32_launches(settings: Settings, tiny_model: Path, tmp_path: Path) -> None:
    with open_service(settings, workers=False) as ctx:
        probe, _ = auth.create_agent(ctx.engine, settings, "probe")
        ds = _dataset(ctx, probe, tmp_path)
        per_job = launch_training(ctx, probe, _request(tiny_model, ds, dry_run=True)).estimate.flops
        agent, _ = auth.create_agent(ctx.engine, settings, "racer", budget_flops=per_job * 5.5,
                                     max_concurrent_jobs=100)
        ds = _dataset(ctx, agent, tmp_path)

        def launch(i: int) -> str:
            try:
                launch_training(ctx, agent, _request(tiny_model, ds, idempotency_key=f"k{i}"))
                return "admitted"
            except LimitExceeded as err:
                assert err.param == "budget_flops"
                return "refused"

        with ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = list(pool.map(launch, range(32)))
        assert outcomes.count("admitted") == 5
        with Session(ctx.engine) as session:
            assert session.exec(select(func.count()).select_from(Job).where(Job.agent_id == agent.id)).one() == 5
            reserved = session.exec(select(func.sum(Reservation.flops_reserved))
                                    .where(Reservation.agent_id == agent.id)).one()
            assert reserved <= agent.budget_flops


def test_32_concurrent_launches_admit_exactly_what_the_budget_fits_on_sqlite(
        settings: Settings, tiny_model: Path, tmp_path: Path) -> None:
    _race_32_launches(settings, tiny_model, tmp_path)


def test_32_concurrent_launches_admit_exactly_what_the_budget_fits_on_postgres(
        settings: Settings, tiny_model: Path, tmp_path: Path) -> None:
    bin_dir, reason = postgres.available_or_reason()
    if bin_dir is None:
        pytest.skip(reason)
    with postgres.postgres_server(bin_dir) as url:
        _race_32_launches(settings.model_copy(update={"database_url": url}), tiny_model, tmp_path)


def test_request_over_the_compute_cap_is_refused_with_what_would_fit(service, tiny_model: Path,
                                                                     tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "capped")
    ds = _dataset(service, agent, tmp_path)
    per_step = launch_training(service, agent, _request(tiny_model, ds, dry_run=True)).estimate.flops / 8
    capped, _ = auth.create_agent(service.engine, service.settings, "small-cap", max_request_flops=per_step * 3.5)
    ds = _dataset(service, capped, tmp_path)
    with pytest.raises(LimitExceeded) as refusal:
        launch_training(service, capped, _request(tiny_model, ds))
    assert refusal.value.param == "max_request_flops"
    assert "max_steps <= 3 fits" in refusal.value.message
    assert refusal.value.details["estimate_flops"] == pytest.approx(per_step * 8)
    fitting = launch_training(service, capped,
                              _request(tiny_model, ds, hyperparameters=quick_hyperparameters(max_steps=3)))
    assert fitting.admitted and fitting.job is not None


def test_dry_run_prices_the_request_and_creates_nothing(service, tiny_model: Path, tmp_path: Path) -> None:
    agent, _ = auth.create_agent(service.engine, service.settings, "pricer", max_request_flops=1.0)
    ds = _dataset(service, agent, tmp_path)
    result = launch_training(service, agent, _request(tiny_model, ds, dry_run=True))
    assert not result.admitted and result.job is None
    assert "max_request_flops" in (result.refusal or "") and result.max_steps_that_fit == 0
    assert result.estimate.flops == 6 * result.estimate.parameters * result.estimate.tokens
    with Session(service.engine) as session:
        assert session.exec(select(func.count()).select_from(Job)).one() == 0
        assert session.exec(select(func.count()).select_from(Reservation)).one() == 0


def test_jobs_at_once_are_capped_per_agent(settings: Settings, tiny_model: Path, tmp_path: Path) -> None:
    with open_service(settings, workers=False) as ctx:
        agent, _ = auth.create_agent(ctx.engine, settings, "busy", max_concurrent_jobs=2)
        ds = _dataset(ctx, agent, tmp_path)
        launch_training(ctx, agent, _request(tiny_model, ds, idempotency_key="a"))
        launch_training(ctx, agent, _request(tiny_model, ds, idempotency_key="b"))
        with pytest.raises(LimitExceeded) as refusal:
            launch_training(ctx, agent, _request(tiny_model, ds, idempotency_key="c"))
        assert refusal.value.param == "max_concurrent_jobs"


@pytest.mark.parametrize("packing", [False, True])
def test_a_chat_job_is_priced_at_what_it_trains_on_packed_or_not(service, tiny_model: Path, tmp_path: Path,
                                                                 packing: bool) -> None:
    # Records counted with the model's tokenizer and chat template (the report's ~4 characters a token
    # priced these at two thirds of their use); packed, a step trains on full sequences (5x its
    # record-length price before) and an epoch on fewer of them than records.
    agent = auth.ensure_local_agent(service.engine, service.settings)
    ds = _dataset(service, agent, tmp_path)
    hyper = {"max_seq_length": 256, "packing": packing}
    done = _trained(service, agent, _request(tiny_model, ds, hyperparameters=quick_hyperparameters(
        max_steps=4, save_steps=1000, **hyper)))
    assert 0.7 * done.estimate_flops < done.flops_used <= done.estimate_flops
    one_epoch = launch_training(service, agent, _request(tiny_model, ds, dry_run=True, hyperparameters={
        **hyper, "epochs": 1, "per_device_batch_size": 4, "eval_fraction": 0.0})).estimate
    if not packing:
        assert one_epoch.max_steps == 48 // 4  # a record a sequence
        return
    model = ModelTokens.load(tiny_model)
    assert model is not None
    data_tokens = sum(record_tokens(model, record) for record in chat_records())
    per_step = 4 * 256
    # One epoch's packed steps hold the data, with no step to spare (unpacked it would be 12 steps).
    assert (one_epoch.max_steps - 1) * per_step < data_tokens <= one_epoch.max_steps * per_step


def test_the_performance_switches_reach_the_job_and_checkpointing_is_priced(service, tiny_model: Path,
                                                                            tmp_path: Path) -> None:
    agent = auth.ensure_local_agent(service.engine, service.settings)
    ds = _dataset(service, agent, tmp_path)
    plain = launch_training(service, agent, _request(tiny_model, ds, dry_run=True)).estimate
    switches = {"precision": "fp32", "padding_free": False, "gradient_checkpointing": True, "liger_kernels": False}
    checkpointed = launch_training(service, agent, _request(tiny_model, ds, dry_run=True, hyperparameters=(
        quick_hyperparameters(**switches)))).estimate
    assert checkpointed.flops == plain.flops * 8 / 6  # one more forward pass, recomputed in backward
    done = _trained(service, agent, _request(tiny_model, ds, hyperparameters=quick_hyperparameters(
        max_steps=3, save_steps=1000, **switches)))
    spec = done.resolved["spec"]["hyperparameters"]
    assert {name: spec[name] for name in switches} == switches
    assert done.metrics["precision"] == "fp32"

