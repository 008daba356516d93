"""Time clocks (interval, cron, rrule): pure next-tick functions, stable ids, cursor, catch-up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, CursorStore
from actors.clocks.schedule import (
    CronSchedule,
    IntervalSchedule,
    RRuleSchedule,
    Schedule,
    catch_up,
    compile_rrule,
    missed_ticks,
    wall_to_utc,
)
from actors.clocks.time import (
    CronClock,
    IntervalClock,
    RRuleClock,
    TimeClock,
    next_cron_tick,
    next_interval_tick,
    next_rrule_tick,
)

UTC = UTC


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def interval_clock(cursor_path: Path, name: str = "every", **options: Any) -> IntervalClock:
    spec = ClockSpec(tenant="acme", flow="ingest", name=name, type="interval", options=options)
    return IntervalClock(spec, CursorStore(cursor_path))


def cron_clock(cursor_path: Path, **options: Any) -> CronClock:
    spec = ClockSpec(tenant="acme", flow="ingest", name="nightly", type="cron", options=options)
    return CronClock(spec, CursorStore(cursor_path))


def rrule_clock(cursor_path: Path, **options: Any) -> RRuleClock:
    spec = ClockSpec(tenant="acme", flow="ingest", name="standup", type="rrule", options=options)
    return RRuleClock(spec, CursorStore(cursor_path))


@contextlib.asynccontextmanager
async def running(clock: TimeClock) -> AsyncIterator[AsyncIterator[Batch]]:
    await clock.open()
    batches = clock.batches()
    try:
        yield batches
    finally:
        await batches.aclose()
        await clock.close()


async def next_batch(batches: AsyncIterator[Batch], timeout: float = 5.0) -> Batch:
    return await asyncio.wait_for(anext(batches), timeout)


def test_time_clocks_are_registered_under_their_types() -> None:
    assert CLOCK_TYPES["interval"] is IntervalClock
    assert CLOCK_TYPES["cron"] is CronClock
    assert CLOCK_TYPES["rrule"] is RRuleClock


def test_next_interval_tick_is_aligned_to_the_epoch_by_default() -> None:
    tick = next_interval_tick(at("2024-01-01T12:00:07+00:00"), 60)
    assert tick == at("2024-01-01T12:01:00+00:00")


def test_next_interval_tick_is_strictly_after_a_tick_it_is_given() -> None:
    tick = next_interval_tick(at("2024-01-01T12:01:00+00:00"), 60)
    assert tick == at("2024-01-01T12:02:00+00:00")


def test_next_interval_tick_follows_the_anchor() -> None:
    anchor = at("2024-01-01T00:00:10+00:00")
    after = at("2024-01-01T00:05:00+00:00")
    assert next_interval_tick(after, 120, anchor) == at("2024-01-01T00:06:10+00:00")


def test_next_interval_tick_before_the_anchor_still_lands_on_the_grid() -> None:
    anchor = at("2024-01-01T00:00:00+00:00")
    assert next_interval_tick(at("2023-12-31T23:59:59.8+00:00"), 0.25, anchor) == anchor
    before = next_interval_tick(at("2023-12-31T23:59:59.5+00:00"), 0.25, anchor)
    assert before == at("2023-12-31T23:59:59.75+00:00")


@given(
    after=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    every_ms=st.integers(min_value=1, max_value=10 * 86_400_000),
)
def test_next_interval_tick_is_the_first_grid_point_after(after: datetime, every_ms: int) -> None:
    every = timedelta(milliseconds=every_ms)
    tick = next_interval_tick(after, every_ms / 1000)
    assert after < tick <= after + every
    assert (tick - datetime(1970, 1, 1, tzinfo=UTC)) % every == timedelta(0)


def test_next_cron_tick_evaluates_the_expression_in_its_timezone() -> None:
    winter = next_cron_tick(at("2024-01-15T10:00:00+00:00"), "0 9 * * *", "Europe/Berlin")
    summer = next_cron_tick(at("2024-07-15T10:00:00+00:00"), "0 9 * * *", "Europe/Berlin")
    assert winter == at("2024-01-16T08:00:00+00:00")
    assert summer == at("2024-07-16T07:00:00+00:00")
    assert winter.tzinfo is not None and winter.utcoffset() == timedelta(0)


def test_next_cron_tick_is_strictly_after_a_matching_time_with_sub_seconds() -> None:
    assert next_cron_tick(at("2024-01-01T12:00:00.500+00:00"), "0 12 * * *") == at(
        "2024-01-02T12:00:00+00:00"
    )
    assert next_cron_tick(at("2024-01-01T12:00:00+00:00"), "*/5 * * * *") == at(
        "2024-01-01T12:05:00+00:00"
    )


async def test_interval_ticks_have_stable_aligned_ids_and_tick_payloads(tmp_path: Path) -> None:
    clock = interval_clock(tmp_path / "c.json", every="250ms")
    async with running(clock) as batches:
        first = await next_batch(batches)
        second = await next_batch(batches)
    assert clock.source == "interval:250ms"
    (one,), (two,) = first.events, second.events
    t1, t2 = at(one.occurred), at(two.occurred)
    assert t2 - t1 == timedelta(milliseconds=250)
    assert t1.microsecond % 250_000 == 0 and t1.utcoffset() == timedelta(0)
    assert one.id == f"every:{one.occurred}"
    assert one.type == "tick"
    assert one.payload == {"scheduled": one.occurred, "clock": "every", "kind": "interval"}


async def test_a_restarted_interval_clock_never_re_emits_acked_ticks(tmp_path: Path) -> None:
    clock = interval_clock(tmp_path / "c.json", every=0.2)
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
    assert clock.cursor.load() == {"last": first.events[0].occurred}

    restarted = interval_clock(tmp_path / "c.json", every=0.2)
    async with running(restarted) as batches:
        second = await next_batch(batches)
    assert at(second.events[0].occurred) > at(first.events[0].occurred)


async def test_a_tick_is_acked_without_fsync_and_other_cursors_keep_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    clock = interval_clock(tmp_path / "c.json", every=0.2)
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
    assert clock.cursor.load() == {"last": first.events[0].occurred}
    assert synced == []  # a lost tick cursor only re-emits ids the ledger already holds
    CursorStore(tmp_path / "files.json").save({"files": {}})
    assert len(synced) == 1  # sources whose events are not re-derivable still fsync


async def test_a_restarted_clock_does_not_catch_up_missed_ticks(tmp_path: Path) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    CursorStore(tmp_path / "c.json").save({"last": long_ago.isoformat()})
    clock = interval_clock(tmp_path / "c.json", every="100ms")
    opened = datetime.now(UTC)
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert at(batch.events[0].occurred) > opened


async def test_a_cursor_in_the_future_holds_ticks_until_after_it(tmp_path: Path) -> None:
    ahead = next_interval_tick(datetime.now(UTC), 0.1) + timedelta(milliseconds=300)
    CursorStore(tmp_path / "c.json").save({"last": ahead.isoformat()})
    clock = interval_clock(tmp_path / "c.json", every="100ms")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert at(batch.events[0].occurred) == ahead + timedelta(milliseconds=100)


async def test_a_cron_clock_emits_the_tick_at_its_scheduled_minute(tmp_path: Path) -> None:
    clock = cron_clock(tmp_path / "c.json", cron="*/5 * * * *", timezone="Asia/Kolkata")
    real_now = datetime.now(UTC)
    boundary = next_cron_tick(real_now, "*/5 * * * *", "Asia/Kolkata")
    skew = boundary - real_now - timedelta(milliseconds=200)  # pretend the tick is 0.2 s away
    clock.now = lambda: datetime.now(UTC) + skew  # type: ignore[method-assign]
    async with running(clock) as batches:
        batch = await next_batch(batches)
    (tick,) = batch.events
    assert clock.source == "cron:*/5 * * * *"
    assert tick.occurred == boundary.isoformat()
    assert tick.id == f"nightly:{boundary.isoformat()}"
    assert tick.payload["kind"] == "cron"


# --- rrule: the pure next tick ---------------------------------------------------------------

STANDUP = "FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=0"


def test_next_rrule_tick_follows_wall_time_in_its_timezone_across_dst() -> None:
    after = at("2024-03-22T12:00:00+00:00")  # a Friday, a week before the spring-forward
    ticks = []
    for _ in range(4):
        after = next_rrule_tick(after, STANDUP, tz="Europe/Berlin")
        ticks.append(after)
    assert ticks == [
        at("2024-03-25T08:00:00+00:00"),  # Monday 09:00 CET
        at("2024-03-27T08:00:00+00:00"),  # Wednesday 09:00 CET
        at("2024-04-01T07:00:00+00:00"),  # Monday 09:00 CEST
        at("2024-04-03T07:00:00+00:00"),
    ]
    assert all(t.utcoffset() == timedelta(0) for t in ticks)


def test_next_rrule_tick_is_strictly_after_a_matching_time_with_sub_seconds() -> None:
    assert next_rrule_tick(at("2024-03-25T09:00:00+00:00"), STANDUP) == at(
        "2024-03-27T09:00:00+00:00"
    )
    assert next_rrule_tick(at("2024-03-25T08:59:59.999+00:00"), STANDUP) == at(
        "2024-03-25T09:00:00+00:00"
    )


def test_rrule_defaults_come_from_dtstart_and_ticks_never_precede_it() -> None:
    # No BYHOUR/BYMINUTE: the time of day comes from dtstart (default: midnight in the zone).
    assert next_rrule_tick(at("2024-05-05T12:00:00+00:00"), "FREQ=DAILY", tz="Asia/Kolkata") == at(
        "2024-05-05T18:30:00+00:00"
    )
    start = datetime(2030, 6, 1, 7, 15)
    first = next_rrule_tick(at("2024-01-01T00:00:00+00:00"), "FREQ=DAILY;INTERVAL=3", start)
    assert first == at("2030-06-01T07:15:00+00:00")
    assert next_rrule_tick(first, "FREQ=DAILY;INTERVAL=3", start) == at("2030-06-04T07:15:00+00:00")


def test_a_finished_rrule_has_no_next_tick() -> None:
    start = datetime(2024, 1, 1, 9)
    rule = "FREQ=DAILY;COUNT=3"
    assert next_rrule_tick(at("2024-01-02T09:00:00+00:00"), rule, start) == at(
        "2024-01-03T09:00:00+00:00"
    )
    assert next_rrule_tick(at("2024-01-03T09:00:00+00:00"), rule, start) is None
    assert (
        next_rrule_tick(at("2031-01-01T00:00:00+00:00"), "FREQ=DAILY;UNTIL=20301231T000000Z")
        is None
    )


def test_wall_times_skipped_or_repeated_by_dst_map_to_one_instant_in_order() -> None:
    berlin = compile_rrule(
        "FREQ=DAILY;BYHOUR=2,3;BYMINUTE=30", datetime(2000, 1, 1), "Europe/Berlin"
    )
    assert isinstance(berlin, RRuleSchedule)
    spring = berlin.ticks_between(at("2024-03-30T12:00:00+00:00"), at("2024-03-31T12:00:00+00:00"))
    # 02:30 does not exist on 2024-03-31: it fires at the jump (03:00 CEST), then 03:30 CEST.
    assert spring == [at("2024-03-31T01:00:00+00:00"), at("2024-03-31T01:30:00+00:00")]
    autumn = berlin.ticks_between(at("2024-10-26T12:00:00+00:00"), at("2024-10-27T12:00:00+00:00"))
    # 02:30 happens twice on 2024-10-27: it fires once, at the first.
    assert autumn == [at("2024-10-27T00:30:00+00:00"), at("2024-10-27T02:30:00+00:00")]
    zone = berlin.zone
    assert wall_to_utc(datetime(2024, 3, 31, 2, 0), zone) == at("2024-03-31T01:00:00+00:00")
    assert wall_to_utc(datetime(2024, 3, 31, 1, 59), zone) == at("2024-03-31T00:59:00+00:00")


RULES = [
    "FREQ=MINUTELY;INTERVAL=7",
    "FREQ=HOURLY;INTERVAL=5;BYMINUTE=10,40",
    "FREQ=DAILY;BYHOUR=2,3,14;BYMINUTE=30",
    "FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,FR;BYHOUR=9;BYMINUTE=0",
    "FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17",
    "FREQ=MONTHLY;INTERVAL=5;BYMONTHDAY=31",
    "FREQ=YEARLY;BYMONTH=3,10;BYDAY=-1SU;BYHOUR=2;BYMINUTE=30",
    "FREQ=SECONDLY;INTERVAL=90;BYHOUR=9",
]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rule=st.sampled_from(RULES),
    tz=st.sampled_from(ZONES),
    start=st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2021, 1, 1)),
    offset=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=40)),
)
def test_rrule_rebasing_finds_the_same_tick_as_walking_from_dtstart(
    rule: str, tz: str, start: datetime, offset: timedelta
) -> None:
    fast = compile_rrule(rule, start, tz)
    slow = dataclasses.replace(fast, rebase=False)
    after = (start + offset).replace(tzinfo=UTC)
    assert fast.next_after(after) == slow.next_after(after)


# --- catch-up: the pure decision -------------------------------------------------------------

MINUTELY = IntervalSchedule(60)
NOON = at("2024-01-01T12:00:00+00:00")


def test_catch_up_none_latest_all_after_an_outage() -> None:
    cursor = at("2024-01-01T11:55:00+00:00")
    assert missed_ticks(cursor, NOON, MINUTELY, "none") == []
    assert missed_ticks(cursor, NOON, MINUTELY, "latest") == [NOON]
    assert missed_ticks(cursor, NOON, MINUTELY, "all") == [
        at(f"2024-01-01T11:5{m}:00+00:00") for m in (6, 7, 8, 9)
    ] + [NOON]


def test_missed_ticks_exclude_the_cursor_and_the_future() -> None:
    cursor = at("2024-01-01T11:58:00+00:00")
    now = at("2024-01-01T11:59:59.9+00:00")
    assert missed_ticks(cursor, now, MINUTELY, "all") == [at("2024-01-01T11:59:00+00:00")]
    assert missed_ticks(cursor, cursor, MINUTELY, "all") == []
    assert missed_ticks(NOON, cursor, MINUTELY, "all") == []  # a cursor ahead of now


def test_without_a_cursor_nothing_was_missed() -> None:
    for policy in ("none", "latest", "all"):
        assert missed_ticks(None, NOON, MINUTELY, policy) == []


def test_catch_up_all_keeps_the_most_recent_max_catchup_and_counts_the_rest() -> None:
    cursor = NOON - timedelta(days=30)  # 43,200 missed minutes
    decided = catch_up(cursor, NOON, MINUTELY, "all", max_catchup=3)
    assert decided.ticks == [NOON - timedelta(minutes=2), NOON - timedelta(minutes=1), NOON]
    assert decided.dropped == 43_200 - 3 and not decided.dropped_at_least
    cron = catch_up(cursor, NOON, CronSchedule("* * * * *"), "all", max_catchup=3)
    assert cron.ticks == decided.ticks
    assert cron.dropped >= 5_000 and cron.dropped_at_least  # counted one by one, up to a limit


def test_catch_up_on_a_sparse_schedule_looks_back_far_enough() -> None:
    yearly = CronSchedule("0 0 1 1 *")
    cursor = at("2019-06-01T00:00:00+00:00")
    assert missed_ticks(cursor, NOON, yearly, "latest") == [at("2024-01-01T00:00:00+00:00")]
    assert missed_ticks(cursor, NOON, yearly, "all", 2) == [
        at("2023-01-01T00:00:00+00:00"),
        at("2024-01-01T00:00:00+00:00"),
    ]
    finished = compile_rrule("FREQ=DAILY;COUNT=2", datetime(2023, 1, 1), "UTC")
    assert missed_ticks(cursor, NOON, finished, "all") == [
        at("2023-01-01T00:00:00+00:00"),
        at("2023-01-02T00:00:00+00:00"),
    ]


def test_an_unknown_catch_up_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="catch-up policy"):
        missed_ticks(NOON - timedelta(hours=1), NOON, MINUTELY, "some")


schedules = st.one_of(
    st.builds(
        IntervalSchedule,
        every=st.integers(min_value=60, max_value=6 * 3600).map(float),
        anchor=st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
        ),
    ),
    st.builds(
        CronSchedule,
        expr=st.sampled_from(["*/7 * * * *", "0 9 * * 1-5", "*/15 8-18 * * *", "30 2 * * *"]),
        tz=st.sampled_from(ZONES),
    ),
    st.builds(
        compile_rrule,
        text=st.sampled_from(RULES[:5]),
        dtstart=st.just(datetime(2000, 1, 1)),
        tz=st.sampled_from(ZONES),
    ),
)
instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)
spans = st.timedeltas(min_value=timedelta(seconds=-60), max_value=timedelta(days=2))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=schedules,
    cursor=instants,
    span=spans,
    max_catchup=st.integers(min_value=1, max_value=50),
)
def test_missed_ticks_properties(
    schedule: Schedule, cursor: datetime, span: timedelta, max_catchup: int
) -> None:
    now = cursor + span
    unbounded = missed_ticks(cursor, now, schedule, "all", max_catchup=None)
    bounded = catch_up(cursor, now, schedule, "all", max_catchup)
    latest = missed_ticks(cursor, now, schedule, "latest")
    for ticks in (unbounded, bounded.ticks, latest):
        assert all(cursor < t <= now for t in ticks)
        assert all(a < b for a, b in itertools.pairwise(ticks))
        assert all(schedule.next_after(t - timedelta(microseconds=1)) == t for t in ticks)
    assert len(bounded.ticks) <= max_catchup
    assert bounded.ticks == unbounded[-max_catchup:]
    assert bounded.dropped == len(unbounded) - len(bounded.ticks)
    assert len(latest) <= 1
    assert latest == unbounded[-1:]
    assert missed_ticks(cursor, now, schedule, "none") == []
    # Nothing between the cursor and the first missed tick, nor after the last one.
    if unbounded:
        assert schedule.next_after(cursor) == unbounded[0]
    tick = schedule.next_after(unbounded[-1] if unbounded else max(cursor, now))
    assert tick is None or tick > now


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs option 'rrule'"),
        ({"rrule": ""}, "must be an RFC 5545 RRULE string"),
        ({"rrule": 5}, "must be an RFC 5545 RRULE string"),
        ({"rrule": "every monday"}, "not a valid RRULE.*NAME=VALUE"),
        ({"rrule": "BYDAY=MO"}, "not a valid RRULE.*FREQ"),
        ({"rrule": "FREQ=DAILY;FOO=1"}, "not a valid RRULE.*unknown parameter 'FOO'"),
        ({"rrule": "FREQ=WEEKLY;BYDAY=XX"}, "not a valid RRULE.*BYDAY"),
        ({"rrule": "FREQ=DAILY;INTERVAL=0"}, "INTERVAL must be a positive integer"),
        ({"rrule": "FREQ=DAILY;BYHOUR=25"}, "hour must be in 0..23"),
        ({"rrule": "FREQ=DAILY;UNTIL=20300101T000000"}, "UNTIL must be a UTC time"),
        ({"rrule": "FREQ=DAILY\nEXDATE:20240101T000000Z"}, "one RRULE"),
        ({"rrule": "DTSTART:20240101T000000Z\nRRULE:FREQ=DAILY"}, "option 'dtstart'"),
        ({"rrule": "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30"}, "matches no time"),
        ({"rrule": "FREQ=DAILY", "dtstart": "tomorrow"}, "option 'dtstart': bad ISO"),
        ({"rrule": "FREQ=DAILY", "timezone": "Mars/Olympus"}, "'timezone'"),
        ({"rrule": "FREQ=DAILY", "start": "2024-01-01"}, "unknown option 'start'"),
    ],
)
def test_a_bad_rrule_option_is_named_in_the_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RRuleClock.check_options({"type": "rrule", **options})


@pytest.mark.parametrize("cls", [IntervalClock, CronClock, RRuleClock])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"catchup": "some"}, "option 'catchup' must be one of none, latest, all"),
        ({"catchup": True}, "option 'catchup'"),
        ({"max_catchup": 0}, "option 'max_catchup' must be an integer from 1"),
        ({"max_catchup": "10"}, "option 'max_catchup'"),
        ({"max_catchup": True}, "option 'max_catchup'"),
        ({"max_catchup": 10**6}, "option 'max_catchup'"),
    ],
)
def test_a_bad_catch_up_option_is_named_in_the_error(
    cls: type[TimeClock], options: dict[str, Any], message: str
) -> None:
    base = {"every": "1m", "cron": "* * * * *", "rrule": "FREQ=HOURLY"}
    valid = {k: v for k, v in base.items() if k in cls.options}
    with pytest.raises(ValueError, match=message):
        cls.check_options({"type": cls.type, **valid, **options})


def test_rrule_options_accept_a_dtstart_with_or_without_offset_and_the_rrule_prefix() -> None:
    for dtstart in ("2024-01-01T09:30", "2024-01-01T08:30:00Z", datetime(2024, 1, 1, 9, 30)):
        RRuleClock.check_options(
            {"rrule": "RRULE:freq=daily", "dtstart": dtstart, "timezone": "Europe/Berlin"}
        )
    for policy in ("none", "latest", "all", None):
        IntervalClock.check_options({"every": "1m", "catchup": policy, "max_catchup": 5})


# --- the clocks: rrule ticks and catch-up on open --------------------------------------------


async def test_an_rrule_clock_emits_ticks_with_stable_ids_and_rrule_payloads(
    tmp_path: Path,
) -> None:
    clock = rrule_clock(tmp_path / "c.json", rrule="FREQ=SECONDLY;INTERVAL=1")
    async with running(clock) as batches:
        first = await next_batch(batches)
        second = await next_batch(batches)
    (one,), (two,) = first.events, second.events
    assert clock.source == "rrule:FREQ=SECONDLY;INTERVAL=1"
    assert at(two.occurred) - at(one.occurred) == timedelta(seconds=1)
    assert one.id == f"standup:{one.occurred}" and one.type == "tick"
    assert one.payload == {"scheduled": one.occurred, "clock": "standup", "kind": "rrule"}
    assert at(one.occurred).microsecond == 0 and at(one.occurred).utcoffset() == timedelta(0)


async def test_a_finished_rrule_clock_keeps_listening_without_ticks(tmp_path: Path) -> None:
    clock = rrule_clock(tmp_path / "c.json", rrule="FREQ=DAILY;COUNT=2", dtstart="2020-01-01")
    async with running(clock) as batches:
        with pytest.raises(asyncio.TimeoutError):
            await next_batch(batches, timeout=0.2)
        assert clock.state == "listening"


async def test_a_clock_opened_with_an_old_cursor_and_catchup_all_yields_missed_ticks_first(
    tmp_path: Path,
) -> None:
    cursor = next_interval_tick(datetime.now(UTC) - timedelta(seconds=1), 0.1)
    CursorStore(tmp_path / "c.json").save({"last": cursor.isoformat()})
    clock = interval_clock(tmp_path / "c.json", every="100ms", catchup="all")
    async with running(clock) as batches:
        caught_up = await next_batch(batches)
        opened = datetime.now(UTC)
        await clock.ack(caught_up)
        live = await next_batch(batches)
    scheduled = [at(e.occurred) for e in caught_up.events]
    assert len(scheduled) >= 9  # the cursor is about a second old
    assert scheduled[0] == cursor + timedelta(milliseconds=100)
    assert all(b - a == timedelta(milliseconds=100) for a, b in itertools.pairwise(scheduled))
    assert scheduled[-1] <= opened
    assert [e.id for e in caught_up.events] == [f"every:{e.occurred}" for e in caught_up.events]
    assert caught_up.token == scheduled[-1]
    assert clock.cursor.load() == {"last": scheduled[-1].isoformat()}
    (tick,) = live.events
    assert at(tick.occurred) > scheduled[-1]
    assert (at(tick.occurred) - cursor) % timedelta(milliseconds=100) == timedelta(0)


async def test_catchup_latest_re_emits_one_tick_with_the_id_of_the_schedule(
    tmp_path: Path,
) -> None:
    CursorStore(tmp_path / "c.json").save({"last": "2024-01-01T00:00:00+00:00"})
    ids = []
    for _ in range(2):  # two restarts from the same cursor: the same tick, the same id
        clock = cron_clock(tmp_path / "c.json", cron="0 * * * *", catchup="latest")
        clock.now = lambda: NOON + timedelta(minutes=30)  # type: ignore[method-assign]
        async with running(clock) as batches:
            batch = await next_batch(batches)
        ids.append([e.id for e in batch.events])
    assert ids == [["nightly:2024-01-01T12:00:00+00:00"]] * 2


async def test_catchup_all_beyond_max_catchup_logs_the_dropped_ticks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CursorStore(tmp_path / "c.json").save({"last": "2024-01-01T11:00:00+00:00"})
    clock = interval_clock(tmp_path / "c.json", every="1m", catchup="all", max_catchup=2)
    clock.now = lambda: NOON  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="actors.clocks.time"):
        async with running(clock) as batches:
            batch = await next_batch(batches)
    assert [e.occurred for e in batch.events] == [
        "2024-01-01T11:59:00+00:00",
        "2024-01-01T12:00:00+00:00",
    ]
    assert "58 missed ticks dropped" in caplog.text


async def test_a_first_start_with_catchup_all_waits_for_the_next_tick(tmp_path: Path) -> None:
    clock = interval_clock(tmp_path / "c.json", every="100ms", catchup="all")
    opened = datetime.now(UTC)
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert len(batch.events) == 1 and at(batch.events[0].occurred) > opened
