"""A schedule's trigger and policies: when it fires, which firings are due now, what to do on overlap.

    {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}     five-field cron in an IANA zone
    {"every": "PT1H", "anchor": "2026-01-01T00:00:00Z"}      anchor + k * every (seconds or ISO 8601)
    {"at": "2026-04-01T09:00:00+02:00"}                      once
    {"after": "job_...", "when": "state == \\"succeeded\\""}  when that job or schedule run ends
    {"on_dataset": "tickets"}                                 when a snapshot of that dataset arrives

Cron times are computed by cronsim, which follows Debian's cron through daylight-saving changes: a
job at a fixed time that falls in the skipped hour fires once right after the gap, a fixed time in
the repeated hour fires once, and jobs whose minute or hour field starts with `*` follow the wall
clock (so `*/30 * * * *` also fires twice in the repeated hour). All times in and out are
timezone-aware; results are in UTC. `after` and `on_dataset` are events: no fire times of their own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from server.errors import InvalidRequest
from server.schedules import refusal
from server.schedules.conditions import Schema, parse
from server.schedules.pipelines import OUTPUTS

MIN_INTERVAL = timedelta(seconds=60)
NONE_GRACE = timedelta(seconds=60)  # catch-up "none" still starts a firing this late (a slow scheduler tick)
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
           "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_FIELD_RANGES = {"minute": "0-59", "hour": "0-23", "day-of-month": "1-31", "month": "1-12 or JAN-DEC",
                 "day-of-week": "0-7 or SUN-SAT"}
_DURATION = re.compile(r"^P(?:(?P<weeks>\d+)W|(?:(?P<days>\d+)D)?"
                       r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?)$")
_WORK_ID = re.compile(r"^(job|sch)_[A-Za-z0-9]+$")
# What an `after` condition may name: the state of the work that ended and what it made.
AFTER_CONTEXT: Schema = {**{name: sub for outputs in OUTPUTS.values() for name, sub in outputs.items()},
                         "state": None, "kind": None, "error": {"code": None, "message": None, "param": None}}
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class CronTrigger(BaseModel):
    model_config = _STRICT
    cron: str = Field(description="Five fields: minute hour day-of-month month day-of-week, e.g. '30 2 * * *' "
                                  "(or @hourly, @daily, @weekly, @monthly, @yearly). Daylight saving as in "
                                  "Debian's cron: a fixed time in the skipped hour fires right after the gap, "
                                  "one in the repeated hour fires once.")
    timezone: str = Field("UTC", description="IANA time zone the fields are read in, e.g. Europe/Berlin.")

    @property
    def expression(self) -> str:
        return _MACROS.get(self.cron.strip(), self.cron.strip())

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        expression = _MACROS.get(cron.strip(), cron.strip())
        if len(expression.split()) != 5:
            raise ValueError(f"{cron!r} has {len(expression.split())} fields; a cron has five: minute hour "
                             "day-of-month month day-of-week, e.g. '30 2 * * *'")
        try:
            CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as err:
            field = str(err).removeprefix("Bad ")
            raise ValueError(f"{cron!r} has a malformed or out-of-range {field} field (allowed: "
                             f"{_FIELD_RANGES.get(field, 'see crontab(5)')}, with * , - /)") from err
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"{timezone!r} is not an IANA time zone; use a name such as Europe/Berlin, "
                             "America/New_York or UTC") from err
        return timezone


class EveryTrigger(BaseModel):
    model_config = _STRICT
    every: int | str = Field(description="The interval: seconds (at least 60) or an ISO 8601 duration such as "
                                         "PT30M, PT1H, P1D, P1DT12H, P1W. Months and years are refused (their "
                                         "length varies): use days or a cron.")
    anchor: AwareDatetime | None = Field(None, description="Fire times are anchor + k * every. Default: when "
                                                           "the schedule is created (first firing one interval "
                                                           "later).")

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=_seconds(self.every))

    @field_validator("every", mode="before")
    @classmethod
    def _seconds_or_duration(cls, every: Any) -> int | str:
        if isinstance(every, float) and every.is_integer():
            every = int(every)
        if isinstance(every, bool) or not isinstance(every, int | str):
            raise ValueError(  # noqa: TRY004 -- pydantic turns only a ValueError into a field error
                f"{every!r} is neither whole seconds (3600) nor an ISO 8601 duration (PT1H)")
        seconds = _seconds(every)
        if seconds < MIN_INTERVAL.total_seconds():
            raise ValueError(f"{every!r} is shorter than the minimum interval of 60 seconds (PT1M)")
        if seconds > 3650 * 86400:
            raise ValueError(f"{every!r} is longer than ten years; use an `at` trigger for a single run")
        return every


class AtTrigger(BaseModel):
    model_config = _STRICT
    at: AwareDatetime = Field(description="Fire once at this ISO 8601 time, with Z or an offset, "
                                          "e.g. 2026-04-01T09:00:00+02:00.")


class AfterTrigger(BaseModel):
    model_config = _STRICT
    after: str = Field(description="A job id (job_...) or schedule id (sch_...): fire when that work ends.")
    when: str = Field('state == "succeeded"', description=(
        "Condition on the work that ended: state (succeeded, failed, cancelled), kind, error.code and its outputs "
        "(model_id, verdict, kpis.<name>.value, metrics.<name>, ...)."))

    @field_validator("after")
    @classmethod
    def _work_id(cls, after: str) -> str:
        if not _WORK_ID.match(after):
            raise ValueError(f"{after!r} is neither a job id (job_...) nor a schedule id (sch_...)")
        return after

    @field_validator("when")
    @classmethod
    def _condition(cls, when: str) -> str:
        try:
            parse(when, "when", AFTER_CONTEXT)
        except InvalidRequest as err:
            raise ValueError(err.message) from err
        return when


class DatasetTrigger(BaseModel):
    model_config = _STRICT
    on_dataset: str = Field(min_length=1, max_length=200,
                            description="A dataset name: fire when a new snapshot is registered under it.")


TriggerModel = CronTrigger | EveryTrigger | AtTrigger | AfterTrigger | DatasetTrigger
_KINDS: dict[str, type[TriggerModel]] = {"cron": CronTrigger, "every": EveryTrigger, "at": AtTrigger,
                                         "after": AfterTrigger, "on_dataset": DatasetTrigger}


def _kind_of(raw: Any) -> str | None:
    if isinstance(raw, dict):
        kinds = [kind for kind in _KINDS if kind in raw]
        return kinds[0] if len(kinds) == 1 else None
    return next((kind for kind, model in _KINDS.items() if isinstance(raw, model)), None)


# For request models: the JSON schema shows the five shapes; validation picks one by its key.
Trigger = Annotated[
    Annotated[CronTrigger, Tag("cron")] | Annotated[EveryTrigger, Tag("every")] | Annotated[AtTrigger, Tag("at")]
    | Annotated[AfterTrigger, Tag("after")] | Annotated[DatasetTrigger, Tag("on_dataset")],
    Discriminator(_kind_of)]


class CatchUp(BaseModel):
    model_config = _STRICT
    mode: Literal["coalesce", "all", "none"] = Field(
        "coalesce", description="Firings missed while down: coalesce into one; all (up to max_firings); none.")
    window_seconds: int = Field(86400, ge=60, le=30 * 86400, description="Older missed firings are dropped.")
    max_firings: int = Field(10, ge=1, le=100, description="mode all: at most this many at once.")


class Policies(BaseModel):
    model_config = _STRICT
    overlap: Literal["skip", "buffer_one", "allow", "cancel_previous"] = Field(
        "skip", description="While the previous run goes: skip the firing, buffer_one (run it after), allow, or "
                            "cancel_previous.")
    catch_up: CatchUp = Field(default_factory=lambda: CatchUp(),
                              description="After the service was down.")
    jitter_seconds: int = Field(0, ge=0, le=3600, description="Start each firing up to this late.")
    pause_after_failures: int | None = Field(3, ge=1, description="Pause after this many failed or refused runs "
                                                                  "in a row; null: never.")
    end_at: AwareDatetime | None = Field(None, description="No firings after this ISO 8601 time.")
    max_runs: int | None = Field(None, ge=1, description="End after this many firings.")


def parse_trigger(raw: Any, now: datetime, param: str = "trigger") -> TriggerModel:
    """A new schedule's trigger from the JSON an agent sent, or InvalidRequest naming the field.
    `now` (the creation time) becomes an `every` trigger's anchor when it has none."""
    trigger = load_trigger(raw, param)
    if isinstance(trigger, EveryTrigger) and trigger.anchor is None:
        trigger = trigger.model_copy(update={"anchor": now.astimezone(UTC).replace(microsecond=0)})
    if isinstance(trigger, AtTrigger) and trigger.at <= now:
        raise InvalidRequest(f"{trigger.at.isoformat()} has passed (now is {now.astimezone(UTC).isoformat()}); "
                             "give a time in the future", param=f"{param}.at")
    return trigger


def load_trigger(stored: Any, param: str = "trigger") -> TriggerModel:
    """A trigger as `parse_trigger` returned and the store kept it (an `at` may have passed since)."""
    kind = _kind_of(stored)
    if kind is None:
        given = [key for key in _KINDS if key in stored] if isinstance(stored, dict) else []
        raise InvalidRequest(f"a trigger is an object with exactly one of {', '.join(_KINDS)} (got "
                             f"{', '.join(given) or 'none'}), e.g. {{\"cron\": \"30 2 * * *\", \"timezone\": "
                             "\"Europe/Berlin\"}", param=param)
    model = _KINDS[kind]
    try:
        return model.model_validate(stored)
    except ValidationError as err:
        raise refusal(err, param, model) from err


def parse_policies(raw: Any, param: str = "policies") -> Policies:
    try:
        return Policies.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise refusal(err, param, Policies) from err


def next_fire_times(trigger: TriggerModel, after: datetime, count: int,
                    until: datetime | None = None) -> list[datetime]:
    """The next `count` fire times strictly after `after` (and not after `until`), in UTC."""
    upcoming = _fire_times(trigger, after)
    return list(islice(upcoming if until is None else takewhile(lambda t: t <= until, upcoming), count))


def due(trigger: TriggerModel, last_fire: datetime, now: datetime, catch_up: CatchUp) -> list[datetime]:
    """The fire times in (last_fire, now] to start now, by the catch-up policy, oldest first.

    `last_fire` is the latest fire time already handled, or the creation time before the first.
    After starting these, the caller stores `now` as last_fire: the others are dropped for good.
    Jitter is applied when a returned firing starts (fire time + `jitter_offset`), not here; an
    end time is honoured by passing min(now, end_at)."""
    if isinstance(trigger, AfterTrigger | DatasetTrigger):
        return []
    if catch_up.mode == "none":
        earliest, limit = max(last_fire, now - NONE_GRACE), 1
    else:
        earliest = max(last_fire, now - timedelta(seconds=catch_up.window_seconds))
        limit = 1 if catch_up.mode == "coalesce" else catch_up.max_firings
    # Only the latest `limit` matter: look back over a growing span rather than walking a whole
    # window of minutely firings from its start.
    span = timedelta(hours=1)
    while True:
        start = max(earliest, now - span)
        found = list(takewhile(lambda t: t <= now, _fire_times(trigger, start)))
        if len(found) >= limit or start == earliest:
            return found[-limit:]
        span *= 4


def jitter_offset(schedule_id: str, fire_time: datetime, jitter_seconds: float) -> float:
    """Seconds in [0, jitter_seconds) to delay this firing by, the same in every process."""
    if not jitter_seconds:
        return 0.0
    key = f"{schedule_id}|{fire_time.astimezone(UTC).isoformat()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 * jitter_seconds


def overlap_decision(policy: str, running: int,
                     buffered: int) -> Literal["start", "skip", "buffer", "cancel_previous_then_start"]:
    """What a due firing does while `running` runs of its schedule go on and `buffered` wait."""
    if running == 0 or policy == "allow":
        return "start"
    if policy == "cancel_previous":
        return "cancel_previous_then_start"
    if policy == "buffer_one" and buffered == 0:
        return "buffer"
    return "skip"


def _fire_times(trigger: TriggerModel, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after `after`, ascending, in UTC (none for event triggers)."""
    if isinstance(trigger, CronTrigger):
        # Debian's rule makes a fixed time in the repeated hour fire in its first pass; asked from
        # inside the second pass, cronsim may return that earlier instant, which is skipped here.
        for local in CronSim(trigger.expression, after.astimezone(ZoneInfo(trigger.timezone))):
            if (fire_time := local.astimezone(UTC)) > after:
                yield fire_time
    elif isinstance(trigger, EveryTrigger):
        assert trigger.anchor is not None, "parse_trigger sets the anchor"
        step = trigger.interval
        k = max(0, (after - trigger.anchor) // step + 1)
        while True:
            yield (trigger.anchor + k * step).astimezone(UTC)
            k += 1
    elif isinstance(trigger, AtTrigger) and trigger.at > after:
        yield trigger.at.astimezone(UTC)


def _seconds(every: int | str) -> int:
    if isinstance(every, int):
        return every
    if re.match(r"^P[^T]*[YM]", every):
        raise ValueError(f"{every!r} counts months or years, whose length varies; give days (P30D) or use a "
                         "cron such as '0 3 1 * *' for a monthly run")
    match = _DURATION.match(every)
    if not match or not any(match.groupdict().values()):
        raise ValueError(f"{every!r} is not a duration; give seconds (3600) or ISO 8601 such as PT30M, PT1H, "
                         "P1D, P1DT12H or P1W")
    unit_seconds = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
    return sum(unit_seconds[unit] * int(value) for unit, value in match.groupdict().items() if value)
