"""The scheduler against a real store, with an injected clock (no sleeps): catch-up after an outage,
overlap, pause and resume, failures, end times, budgets, datasets that fire, and refusals of bad
schedules. Workers are off here, so a started job stays queued: what is tested is what fires."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.schedules import definitions
from server.schedules.scheduler import Scheduler
from server.service import open_service
from server.settings import Settings
from server.store import agents
from server.store.tables import Agent, Job, Schedule, ScheduleRun
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl
from tools.upload_dataset import UploadDatasetRequest, upload_dataset

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


@pytest.fixture
def store(settings: Settings) -> Iterator[ServiceContext]:
    with open_service(settings, workers=False, scheduler=False) as ctx:
        yield ctx


@pytest.fixture
def agent(store: ServiceContext) -> Agent:
    return agents.create_agent(store.engine, store.settings, "scheduler", max_concurrent_jobs=1000)[0]


def _train(store: ServiceContext, agent: Agent, tmp_path: Path, name: str = "chats") -> dict[str, Any]:
    data = write_jsonl(tmp_path / f"{name}.jsonl", chat_records(16))
    dataset = upload_dataset(store, agent, UploadDatasetRequest(path=str(data), name=name)).dataset
    assert dataset is not None
    return {"base_model": str(store.settings.data_roots[1] / "tiny"), "datasets": [dataset.id],
            "hyperparameters": quick_hyperparameters(max_steps=2)}


def _schedule(store: ServiceContext, agent: Agent, trigger: dict[str, Any], request: dict[str, Any],
              now: float = T0, **fields: Any) -> Schedule:
    spec = definitions.ScheduleSpec.model_validate({"trigger": trigger, "kind": "train", "request": request, **fields})
    return definitions.create(store, agent, spec, now)


def _runs(store: ServiceContext, schedule_id: str) -> list[ScheduleRun]:
    with Session(store.engine) as session:
        return list(session.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
                                 .order_by(col(ScheduleRun.fire_time))))


def _row(store: ServiceContext, schedule_id: str) -> Schedule:
    with Session(store.engine) as session:
        row = session.get(Schedule, schedule_id)
    assert row is not None
    return row


def test_an_hourly_schedule_down_for_a_day_fires_once_on_restart(store: ServiceContext, agent: Agent,
                                                                  tmp_path: Path) -> None:
    schedule = _schedule(store, agent, {"every": 3600}, _train(store, agent, tmp_path))
    scheduler = Scheduler(store, "proc-a")
    assert scheduler.tick(T0 + HOUR + 1) == 1  # the first hour, on time
    assert scheduler.tick(T0 + 26 * HOUR + 30) == 1  # back after a day away: one firing, not 25
    runs = _runs(store, schedule.id)
    assert [r.fire_time for r in runs] == [T0 + HOUR, T0 + 26 * HOUR]
    assert [r.state for r in runs] == ["started", "skipped"]  # the first run's job is still queued: overlap skip
    assert "still going" in runs[1].reason
    assert _row(store, schedule.id).next_fire_at == T0 + 27 * HOUR


def test_overlap_allow_starts_both_and_the_runs_carry_their_jobs(store: ServiceContext, agent: Agent,
                                                                tmp_path: Path) -> None:
    schedule = _schedule(store, agent, {"every": 3600}, _train(store, agent, tmp_path),
                         policies={"overlap": "allow"})
    scheduler = Scheduler(store, "proc-a")
    for hour in (1, 2, 3):
        scheduler.tick(T0 + hour * HOUR + 1)
    runs = _runs(store, schedule.id)
    assert [r.state for r in runs] == ["started"] * 3 and len({r.job_id for r in runs}) == 3
    with Session(store.engine) as session:
        jobs = session.exec(select(Job).where(Job.schedule_id == schedule.id)).all()
    assert {j.id for j in jobs} == {r.job_id for r in runs}
    assert _row(store, schedule.id).runs == 3


def test_pause_stops_firings_and_resume_goes_on_from_now(store: ServiceContext, agent: Agent, tmp_path: Path) -> None:
    schedule = _schedule(store, agent, {"every": 3600}, _train(store, agent, tmp_path), policies={"overlap": "allow"})
    scheduler = Scheduler(store, "proc-a")
    definitions.set_state(store.engine, agent.id, schedule.id, "pause", T0)
    assert scheduler.tick(T0 + 5 * HOUR) == 0
    definitions.set_state(store.engine, agent.id, schedule.id, "resume", T0 + 5 * HOUR + 60)
    assert scheduler.tick(T0 + 5 * HOUR + 120) == 0  # the missed hours are not made up
    assert scheduler.tick(T0 + 6 * HOUR + 1) == 1
    assert [r.fire_time for r in _runs(store, schedule.id)] == [T0 + 6 * HOUR]


def test_refused_firings_are_recorded_and_pause_the_schedule_after_three_in_a_row(
        store: ServiceContext, tmp_path: Path) -> None:
    poor = agents.create_agent(store.engine, store.settings, "poor", budget_flops=1.0, max_concurrent_jobs=100)[0]
    schedule = _schedule(store, poor, {"every": 3600}, _train(store, poor, tmp_path))
    scheduler = Scheduler(store, "proc-a")
    for hour in (1, 2, 3, 4):
        scheduler.tick(T0 + hour * HOUR + 1)
    runs = _runs(store, schedule.id)
    assert [r.state for r in runs] == ["refused"] * 3  # the 4th hour: paused, nothing fired
    assert all("budget_flops" in r.reason for r in runs)
    row = _row(store, schedule.id)
    assert row.state == "paused" and "3 failed or refused runs in a row" in row.state_reason
    with Session(store.engine) as session:
        assert session.exec(select(Job).where(Job.schedule_id == schedule.id)).all() == []


def test_a_schedule_with_its_own_budget_refuses_what_would_pass_it(store: ServiceContext, agent: Agent,
                                                                   tmp_path: Path) -> None:
    schedule = _schedule(store, agent, {"every": 3600}, _train(store, agent, tmp_path), budget_flops=1.0,
                         policies={"pause_after_failures": None})
    Scheduler(store, "proc-a").tick(T0 + HOUR + 1)
    [run] = _runs(store, schedule.id)
    assert run.state == "refused" and "the schedule's own budget" in run.reason
    assert _row(store, schedule.id).state == "active"


def test_end_time_and_max_runs_end_the_schedule(store: ServiceContext, agent: Agent, tmp_path: Path) -> None:
    request = _train(store, agent, tmp_path)
    ends = _schedule(store, agent, {"every": 3600}, request, name="ends", policies={
        "overlap": "allow", "end_at": datetime.fromtimestamp(T0 + 2.5 * HOUR, UTC).isoformat()})
    counted = _schedule(store, agent, {"every": 3600}, request, name="counted",
                        policies={"overlap": "allow", "max_runs": 2})
    scheduler = Scheduler(store, "proc-a")
    for hour in range(1, 6):
        scheduler.tick(T0 + hour * HOUR + 1)
    assert [r.fire_time for r in _runs(store, ends.id)] == [T0 + HOUR, T0 + 2 * HOUR]
    assert [r.fire_time for r in _runs(store, counted.id)] == [T0 + HOUR, T0 + 2 * HOUR]
    assert _row(store, ends.id).state == "ended" and _row(store, counted.id).state == "ended"
    assert definitions.upcoming(_row(store, counted.id), 3, T0) == []


def test_cron_fires_in_its_time_zone_across_the_spring_change(store: ServiceContext, agent: Agent,
                                                               tmp_path: Path) -> None:
    start = datetime(2026, 3, 28, 12, 0, tzinfo=UTC).timestamp()
    schedule = _schedule(store, agent, {"cron": "30 2 * * *", "timezone": "Europe/Berlin"},
                         _train(store, agent, tmp_path), now=start, policies={"overlap": "allow"})
    scheduler = Scheduler(store, "proc-a")
    for hours in range(61):  # until 31 March 00:00Z
        scheduler.tick(start + hours * HOUR)
    fired = [datetime.fromtimestamp(r.fire_time, UTC).isoformat() for r in _runs(store, schedule.id)]
    # 02:30 CET is 01:30Z; on 29 March 02:30 does not exist and Debian's cron runs it at 03:00 CEST (01:00Z);
    # then 02:30 CEST is 00:30Z.
    assert fired == ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]


def test_a_new_snapshot_of_the_named_dataset_fires_and_another_name_does_not(
        store: ServiceContext, agent: Agent, tmp_path: Path) -> None:
    request = _train(store, agent, tmp_path)
    request["datasets"] = ["${trigger.dataset_id}"]
    schedule = _schedule(store, agent, {"on_dataset": "tickets"}, request, now=T0)
    scheduler = Scheduler(store, "proc-a")
    _train(store, agent, tmp_path, name="other")
    assert scheduler.tick() == 0
    data = write_jsonl(tmp_path / "tickets.jsonl", chat_records(20))
    fresh = upload_dataset(store, agent, UploadDatasetRequest(path=str(data), name="tickets")).dataset
    assert fresh is not None
    assert scheduler.tick() == 1
    assert scheduler.tick() == 0  # seen once
    [run] = _runs(store, schedule.id)
    with Session(store.engine) as session:
        job = session.get(Job, run.job_id)
    assert job is not None and job.resolved["dataset_ids"] == [fresh.id]


BAD = [
    ({"trigger": {"cron": "61 * * * *"}}, "trigger.cron"),
    ({"trigger": {"cron": "0 3 * * *", "timezone": "Mars/Olympus"}}, "trigger.timezone"),
    ({"trigger": {"after": "job_missing0"}}, "trigger.after"),
    ({"trigger": {"after": "job_x", "when": "state ==="}}, "trigger.when"),
    ({"request": {"datasets": ["d"], "hyperparameters": {"max_steps": "many"}}}, "request.hyperparameters.max_steps"),
    ({"kind": "pipeline", "request": {"steps": [
        {"name": "gate", "kind": "eval", "request": {"model": "${train.model_id}", "suite_id": "s"}}]}},
     "request.steps[0].request.model"),
    ({"kind": "pipeline", "request": {"steps": [
        {"name": "train", "kind": "train", "request": {"datasets": ["d"], "base_model": "m"}},
        {"name": "ship", "kind": "promote", "request": {"alias": "production", "model": "${train.model_id}"},
         "when": "train.metrics.loss < 1 and gate.verdict == 'pass'"}]}}, "request.steps[1].when"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_schedule_is_refused_naming_the_field_and_nothing_is_created(
        store: ServiceContext, agent: Agent, fields: dict[str, Any], param: str) -> None:
    raw = {"trigger": {"every": 3600}, "kind": "train", "request": {"datasets": ["ds_1"], "base_model": "x"}, **fields}
    with pytest.raises(InvalidRequest) as refused:
        definitions.create(store, agent, definitions.ScheduleSpec.model_validate(raw), T0)
    assert any(where == param for where, _ in refused.value.problems()), refused.value.problems()
    with Session(store.engine) as session:
        assert session.exec(select(Schedule)).all() == []


def test_an_after_schedule_fires_when_its_job_ends_as_its_condition_says(store: ServiceContext, agent: Agent,
                                                                         tmp_path: Path) -> None:
    from server.store import jobs
    from tools.launch_training import LaunchTrainingRequest, launch_training

    request = _train(store, agent, tmp_path)
    watched = launch_training(store, agent, LaunchTrainingRequest.model_validate(request)).job
    other = launch_training(store, agent, LaunchTrainingRequest.model_validate(
        {**request, "hyperparameters": quick_hyperparameters(max_steps=3)})).job
    assert watched is not None and other is not None
    on_cancel = _schedule(store, agent, {"after": watched.id, "when": 'state == "cancelled"'}, request,
                          now=time.time(), name="on-cancel")
    on_success = _schedule(store, agent, {"after": watched.id}, request, now=time.time(), name="on-success")
    scheduler = Scheduler(store, "proc-a")
    assert scheduler.tick() == 0  # still queued
    jobs.request_cancel(store.engine, agent.id, other.id)  # not the one watched
    assert scheduler.tick() == 0
    jobs.request_cancel(store.engine, agent.id, watched.id)
    scheduler.tick()
    assert [r.state for r in _runs(store, on_cancel.id)] == ["started"]
    [skipped] = _runs(store, on_success.id)
    assert skipped.state == "skipped" and 'state == "succeeded" is false' in skipped.reason
    assert scheduler.tick() == 0  # each end fires once
