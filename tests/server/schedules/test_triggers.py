"""Triggers: fire times (Debian cron's daylight-saving rules in Europe/Berlin), catch-up, jitter, overlap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from server.errors import InvalidRequest
from server.schedules.triggers import (
    AfterTrigger,
    AtTrigger,
    CatchUp,
    CronTrigger,
    DatasetTrigger,
    EveryTrigger,
    Policies,
    Trigger,
    due,
    jitter_offset,
    load_trigger,
    next_fire_times,
    overlap_decision,
    parse_policies,
    parse_trigger,
)

BERLIN = ZoneInfo("Europe/Berlin")
CREATED = datetime(2026, 3, 1, tzinfo=UTC)


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
         microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def _every(raw: dict) -> EveryTrigger:
    trigger = parse_trigger(raw, CREATED)
    assert isinstance(trigger, EveryTrigger)
    return trigger


def _iso(times: list[datetime]) -> list[str]:
    return [t.isoformat() for t in times]


def _local_day(trigger_raw: dict, day: datetime) -> list[datetime]:
    """The fire times on one local day, as local times."""
    start = datetime(day.year, day.month, day.day, tzinfo=BERLIN) - timedelta(microseconds=1)
    end = datetime(day.year, day.month, day.day, tzinfo=BERLIN) + timedelta(days=1)
    times = next_fire_times(parse_trigger(trigger_raw, CREATED), start, 200, until=end - timedelta(seconds=1))
    return [t.astimezone(BERLIN) for t in times]


# ---- cron across daylight-saving changes ---------------------------------------------------------

def test_fixed_time_in_the_skipped_hour_fires_once_right_after_the_gap_on_spring_day() -> None:
    trigger = parse_trigger({"cron": "30 2 * * *", "timezone": "Europe/Berlin"}, CREATED)
    assert _iso(next_fire_times(trigger, _utc(2026, 3, 28, 12), 3)) == [
        "2026-03-29T01:00:00+00:00",  # 03:00 CEST: 02:30 does not exist on 29 March
        "2026-03-30T00:30:00+00:00", "2026-03-31T00:30:00+00:00"]


def test_fixed_time_in_the_repeated_hour_fires_once_on_autumn_day() -> None:
    trigger = parse_trigger({"cron": "30 2 * * *", "timezone": "Europe/Berlin"}, CREATED)
    assert _iso(next_fire_times(trigger, _utc(2026, 10, 24, 12), 2)) == [
        "2026-10-25T00:30:00+00:00",  # 02:30 CEST, the first pass; not again at 02:30 CET
        "2026-10-26T01:30:00+00:00"]
    assert [t.strftime("%H:%M") for t in _local_day({"cron": "30 2 * * *", "timezone": "Europe/Berlin"},
                                                    datetime(2026, 10, 25))] == ["02:30"]


def test_fixed_time_job_asked_from_inside_the_second_pass_does_not_fire_again_or_in_the_past() -> None:
    trigger = parse_trigger({"cron": "45 2 * * *", "timezone": "Europe/Berlin"}, CREATED)
    second_pass_0240 = datetime(2026, 10, 25, 2, 40, tzinfo=BERLIN, fold=1)
    assert _iso(next_fire_times(trigger, second_pass_0240.astimezone(UTC), 1)) == ["2026-10-26T01:45:00+00:00"]


def test_every_thirty_minutes_follows_the_wall_clock_through_both_changes() -> None:
    raw = {"cron": "*/30 * * * *", "timezone": "Europe/Berlin"}
    spring = _local_day(raw, datetime(2026, 3, 29))
    autumn = _local_day(raw, datetime(2026, 10, 25))
    assert len(spring) == 46 and len(autumn) == 50  # a 23-hour and a 25-hour day
    for day in (spring, autumn):
        gaps = {b.astimezone(UTC) - a.astimezone(UTC) for a, b in pairwise(day)}
        assert gaps == {timedelta(minutes=30)}
    assert "02:30" not in [t.strftime("%H:%M") for t in spring]
    assert [t.strftime("%H:%M") for t in autumn].count("02:30") == 2


def test_cron_fire_times_are_utc_and_default_to_the_utc_zone() -> None:
    trigger = parse_trigger({"cron": "@daily"}, CREATED)
    times = next_fire_times(trigger, _utc(2026, 3, 28, 12), 2)
    assert _iso(times) == ["2026-03-29T00:00:00+00:00", "2026-03-30T00:00:00+00:00"]
    assert all(t.tzinfo == UTC for t in times)


# ---- every, at, events ---------------------------------------------------------------------------

def test_every_fires_at_the_anchor_plus_whole_intervals() -> None:
    trigger = parse_trigger({"every": "PT1H", "anchor": "2026-01-01T00:15:00Z"}, CREATED)
    assert _iso(next_fire_times(trigger, _utc(2026, 3, 1, 10, 20), 2)) == [
        "2026-03-01T11:15:00+00:00", "2026-03-01T12:15:00+00:00"]


def test_every_accepts_seconds_days_weeks_and_an_anchor_with_an_offset() -> None:
    daily = parse_trigger({"every": "P1D", "anchor": "2026-01-01T02:00:00+01:00"}, CREATED)
    assert _iso(next_fire_times(daily, CREATED, 2)) == ["2026-03-01T01:00:00+00:00", "2026-03-02T01:00:00+00:00"]
    assert _every({"every": 3600}).interval == timedelta(hours=1)
    assert _every({"every": "P1DT12H30M"}).interval == timedelta(days=1, hours=12, minutes=30)
    assert _every({"every": "P2W"}).interval == timedelta(weeks=2)


def test_every_without_anchor_is_anchored_at_creation_and_first_fires_one_interval_later() -> None:
    trigger = parse_trigger({"every": "PT30M"}, _utc(2026, 3, 1, 9, 0, 0, 250))
    assert load_trigger(trigger.model_dump(mode="json")) == trigger
    assert _iso(next_fire_times(trigger, _utc(2026, 3, 1, 9), 2)) == [
        "2026-03-01T09:30:00+00:00", "2026-03-01T10:00:00+00:00"]


def test_every_with_a_future_anchor_first_fires_at_the_anchor() -> None:
    trigger = parse_trigger({"every": 600, "anchor": "2026-03-05T00:00:00Z"}, CREATED)
    assert next_fire_times(trigger, CREATED, 1) == [_utc(2026, 3, 5)]


def test_at_fires_once_and_then_never() -> None:
    trigger = parse_trigger({"at": "2026-04-01T09:00:00+02:00"}, CREATED)
    assert _iso(next_fire_times(trigger, CREATED, 5)) == ["2026-04-01T07:00:00+00:00"]
    assert next_fire_times(trigger, _utc(2026, 4, 1, 7), 5) == []


def test_event_triggers_have_no_fire_times_of_their_own() -> None:
    after = parse_trigger({"after": "job_0123abcd"}, CREATED)
    dataset = parse_trigger({"on_dataset": "tickets"}, CREATED)
    assert isinstance(after, AfterTrigger) and after.when == 'state == "succeeded"'
    assert next_fire_times(after, CREATED, 3) == next_fire_times(dataset, CREATED, 3) == []
    assert due(dataset, CREATED, _utc(2026, 4, 1), CatchUp()) == []


def test_fire_times_stop_at_until() -> None:
    trigger = parse_trigger({"every": "PT1H", "anchor": "2026-03-01T00:00:00Z"}, CREATED)
    assert len(next_fire_times(trigger, CREATED, 100, until=_utc(2026, 3, 1, 5))) == 5


# ---- catch-up ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [{"every": "PT1H", "anchor": "2026-03-01T00:00:00Z"}, {"cron": "0 * * * *"}])
def test_a_day_long_outage_of_an_hourly_schedule_fires_once_on_restart(raw: dict) -> None:
    trigger = parse_trigger(raw, CREATED)
    assert due(trigger, _utc(2026, 3, 1, 0), _utc(2026, 3, 2, 0, 30), CatchUp()) == [_utc(2026, 3, 2, 0)]


def test_a_schedule_on_time_fires_exactly_when_due() -> None:
    trigger = parse_trigger({"cron": "0 * * * *"}, CREATED)
    assert due(trigger, _utc(2026, 3, 1, 10), _utc(2026, 3, 1, 10, 59, 59), CatchUp()) == []
    assert due(trigger, _utc(2026, 3, 1, 10), _utc(2026, 3, 1, 11), CatchUp()) == [_utc(2026, 3, 1, 11)]


def test_missed_firings_older_than_the_window_are_dropped() -> None:
    trigger = parse_trigger({"cron": "0 2 * * *"}, CREATED)
    assert due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 4, 7), CatchUp(window_seconds=3600)) == []
    assert due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 4, 7), CatchUp()) == [_utc(2026, 3, 4, 2)]


def test_catch_up_all_starts_each_missed_firing_within_the_window_up_to_the_cap() -> None:
    trigger = parse_trigger({"cron": "0 * * * *"}, CREATED)
    five = due(trigger, _utc(2026, 3, 1, 0), _utc(2026, 3, 1, 5, 10), CatchUp(mode="all"))
    assert five == [_utc(2026, 3, 1, hour) for hour in range(1, 6)]
    capped = due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 3), CatchUp(mode="all", max_firings=4))
    assert capped == [_utc(2026, 3, 2, 21), _utc(2026, 3, 2, 22), _utc(2026, 3, 2, 23), _utc(2026, 3, 3)]
    windowed = due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 3), CatchUp(mode="all", window_seconds=3 * 3600))
    assert len(windowed) == 3


@pytest.mark.parametrize("raw", [
    {"cron": "*/7 * * * *"}, {"cron": "0 3 * * 1-5", "timezone": "Europe/Berlin"},
    {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}, {"every": "PT25M", "anchor": "2026-03-01T00:03:00Z"}])
def test_due_finds_the_same_firings_as_walking_the_whole_window(raw: dict) -> None:
    trigger = parse_trigger(raw, CREATED)
    for last_hours, down_hours in [(0, 1), (3, 30), (100, 7), (600, 200), (5000, 2000)]:
        last_fire = _utc(2026, 3, 1) + timedelta(hours=last_hours)
        now = last_fire + timedelta(hours=down_hours, minutes=11)
        for catch_up in (CatchUp(), CatchUp(mode="all", max_firings=7), CatchUp(mode="all", window_seconds=7200)):
            earliest = max(last_fire, now - timedelta(seconds=catch_up.window_seconds))
            walked = next_fire_times(trigger, earliest, 100_000, until=now)
            expected = walked[-1:] if catch_up.mode == "coalesce" else walked[-catch_up.max_firings:]
            assert due(trigger, last_fire, now, catch_up) == expected


def test_catch_up_none_starts_only_a_firing_due_within_the_last_minute() -> None:
    trigger = parse_trigger({"cron": "0 * * * *"}, CREATED)
    assert due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 1, 5, 0, 30), CatchUp(mode="none")) == [_utc(2026, 3, 1, 5)]
    assert due(trigger, _utc(2026, 3, 1), _utc(2026, 3, 1, 5, 2), CatchUp(mode="none")) == []


def test_a_minutely_cron_after_a_month_down_coalesces_into_the_latest_minute() -> None:
    trigger = parse_trigger({"cron": "* * * * *"}, CREATED)
    now = _utc(2026, 3, 31, 12, 0, 42)
    assert due(trigger, _utc(2026, 3, 1), now, CatchUp(window_seconds=30 * 86400)) == [_utc(2026, 3, 31, 12)]


def test_an_at_trigger_missed_while_down_fires_once_within_the_window() -> None:
    trigger = parse_trigger({"at": "2026-03-01T06:00:00Z"}, CREATED)
    assert due(trigger, CREATED, _utc(2026, 3, 1, 9), CatchUp()) == [_utc(2026, 3, 1, 6)]
    assert due(trigger, _utc(2026, 3, 1, 9), _utc(2026, 3, 1, 10), CatchUp()) == []


# ---- jitter, overlap, policies -------------------------------------------------------------------

def test_jitter_is_deterministic_bounded_and_spread() -> None:
    fire = _utc(2026, 3, 1, 2)
    assert jitter_offset("sch_a", fire, 300) == jitter_offset("sch_a", fire.astimezone(BERLIN), 300)
    assert jitter_offset("sch_a", fire, 300) != jitter_offset("sch_b", fire, 300)
    offsets = [jitter_offset("sch_a", fire + timedelta(hours=h), 300) for h in range(500)]
    assert all(0 <= offset < 300 for offset in offsets)
    assert min(offsets) < 30 and max(offsets) > 270
    assert jitter_offset("sch_a", fire, 0) == 0.0


@pytest.mark.parametrize(("policy", "running", "buffered", "decision"), [
    ("skip", 0, 0, "start"), ("skip", 1, 0, "skip"),
    ("buffer_one", 1, 0, "buffer"), ("buffer_one", 1, 1, "skip"),
    ("allow", 3, 0, "start"), ("cancel_previous", 1, 0, "cancel_previous_then_start")])
def test_overlap_decision_follows_the_policy(policy: str, running: int, buffered: int, decision: str) -> None:
    assert overlap_decision(policy, running, buffered) == decision


def test_policies_default_to_what_a_user_expects() -> None:
    policies = parse_policies(None)
    assert policies == Policies()
    assert (policies.overlap, policies.catch_up.mode, policies.catch_up.window_seconds) == ("skip", "coalesce", 86400)
    assert (policies.jitter_seconds, policies.pause_after_failures, policies.end_at, policies.max_runs) == (
        0, 3, None, None)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "param", "words"), [
    ({"cron": "61 2 * * *"}, "trigger.cron", "minute field"),
    ({"cron": "30 2 * *"}, "trigger.cron", "a cron has five"),
    ({"cron": "0 0 * * * *"}, "trigger.cron", "a cron has five"),
    ({"cron": "30 2 * * *", "timezone": "Mars/Olympus"}, "trigger.timezone", "IANA time zone"),
    ({"cron": "30 2 * * *", "zone": "UTC"}, "trigger.zone", "the fields are cron, timezone"),
    ({"every": "P1M"}, "trigger.every", "months or years"),
    ({"every": "P1Y2D"}, "trigger.every", "months or years"),
    ({"every": "1h"}, "trigger.every", "ISO 8601"),
    ({"every": 30}, "trigger.every", "minimum interval of 60 seconds"),
    ({"every": True}, "trigger.every", "whole seconds"),
    ({"every": "PT1H", "anchor": "2026-01-01T00:00:00"}, "trigger.anchor", "add Z"),
    ({"at": "2026-04-01T09:00:00"}, "trigger.at", "add Z"),
    ({"at": "next tuesday"}, "trigger.at", "ISO 8601"),
    ({"at": "2026-02-01T09:00:00Z"}, "trigger.at", "has passed"),
    ({"after": "model_1"}, "trigger.after", "job id"),
    ({"after": "job_1", "when": "state =="}, "trigger.when", "is not a condition"),
    ({"after": "job_1", "when": "report.verdict == 'pass'"}, "trigger.when", "report is not a field"),
    ({"on_dataset": ""}, "trigger.on_dataset", "must not be empty"),
    ({"cron": "* * * * *", "at": "2026-04-01T09:00:00Z"}, "trigger", "exactly one of"),
    ("30 2 * * *", "trigger", "exactly one of"),
])
def test_malformed_triggers_are_refused_naming_the_field(raw: object, param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_trigger(raw, CREATED)
    assert refused.value.param == param
    assert words in refused.value.message


def test_malformed_policies_are_refused_all_at_once_naming_each_field() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_policies({"overlap": "queue", "catch_up": {"mode": "all", "window_seconds": 10},
                        "end_at": "2026-05-01T00:00:00"})
    message = refused.value.message
    assert refused.value.param == "policies.overlap"
    assert "policies.overlap: must be one of skip, buffer_one, allow or cancel_previous" in message
    assert "policies.catch_up.window_seconds: must be >= 60" in message
    assert "policies.end_at: is a time without an offset" in message


def test_a_request_model_takes_any_trigger_kind_by_its_key_and_describes_every_field() -> None:
    class ScheduleRequest(BaseModel):
        trigger: Trigger
        policies: Policies = Policies()

    assert isinstance(ScheduleRequest.model_validate({"trigger": {"every": "PT2H"}}).trigger, EveryTrigger)
    assert isinstance(ScheduleRequest.model_validate({"trigger": {"on_dataset": "t"}}).trigger, DatasetTrigger)
    for model in (CronTrigger, EveryTrigger, AtTrigger, AfterTrigger, DatasetTrigger, CatchUp, Policies):
        assert all(field.description for field in model.model_fields.values()), model.__name__
