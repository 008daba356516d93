"""Interval and cron clocks: pure next-tick functions, stable ids, cursor without catch-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, CursorStore
from actors.clocks.time import (
    CronClock,
    IntervalClock,
    TimeClock,
    next_cron_tick,
    next_interval_tick,
)

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def interval_clock(cursor_path: Path, name: str = "every", **options: Any) -> IntervalClock:
    spec = ClockSpec(tenant="acme", flow="ingest", name=name, type="interval", options=options)
    return IntervalClock(spec, CursorStore(cursor_path))


def cron_clock(cursor_path: Path, **options: Any) -> CronClock:
    spec = ClockSpec(tenant="acme", flow="ingest", name="nightly", type="cron", options=options)
    return CronClock(spec, CursorStore(cursor_path))


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
