"""Time clocks: interval and cron. A tick is an event with id ``<clock>:<scheduled UTC ISO>``.

Tick computation is a pure function of (after, schedule) so it is testable without sleeping;
the clocks only sleep until the next tick and remember the last acked one in the cursor. A
restarted clock does not catch up missed ticks: it waits for the next one after now, and never
re-emits a tick at or before its cursor.
"""

from __future__ import annotations

import asyncio
import re
from abc import abstractmethod
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from actors.clocks import register
from actors.clocks.base import Batch, ClockSpec, CursorStore, EventClock, RawEvent
from actors.event import iso

__all__ = [
    "CronClock",
    "IntervalClock",
    "next_cron_tick",
    "next_interval_tick",
    "parse_duration",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_ONE_US = timedelta(microseconds=1)
#: longest single sleep, so a wall-clock jump (suspend, NTP step) is noticed within a minute
_MAX_NAP = 60.0


def parse_duration(value: Any) -> float:
    """Seconds in ``value``: a number of seconds, or ``"250ms"``, ``"60s"``, ``"5m"``, ``"1h30m"``.

    Raises ``ValueError`` for anything else, and for durations that are not positive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"duration must be seconds or a string like '60s', not {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(
                f"bad duration {value!r}: use seconds or e.g. '250ms', '60s', '5m', '1h'"
            )
    else:
        seconds = float(value)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    return seconds


def parse_time(value: Any) -> datetime:
    """An aware datetime from an ISO string or datetime (naive means UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad ISO time {value!r}, e.g. '2024-01-01T00:00:00Z'") from None
    else:
        raise ValueError(f"time must be an ISO string, not {value!r}")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def next_interval_tick(after: datetime, every: float, anchor: datetime = EPOCH) -> datetime:
    """The first ``anchor + k*every`` strictly after ``after`` (UTC; microsecond arithmetic)."""
    step_us = max(1, round(every * 1_000_000))
    elapsed_us = (after - anchor) // _ONE_US
    k = elapsed_us // step_us + 1
    return (anchor + timedelta(microseconds=k * step_us)).astimezone(timezone.utc)


def next_cron_tick(after: datetime, expr: str, tz: str = "UTC") -> datetime:
    """The first time strictly after ``after`` matching ``expr`` in zone ``tz``, in UTC."""
    local = after.astimezone(ZoneInfo(tz))
    tick = croniter(expr, local).get_next(datetime)
    if tick <= after:  # croniter truncates sub-seconds; never return a tick at or before ``after``
        tick = croniter(expr, tick).get_next(datetime)
    return tick.astimezone(timezone.utc)


def check_cron(expr: Any) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"option 'cron' must be a cron expression string, got {expr!r}")
    fields = expr.split()
    if not (len(fields) == 5 or (len(fields) == 1 and fields[0].startswith("@"))):
        raise ValueError(
            f"option 'cron' must have 5 fields (minute hour day month weekday), got {expr!r}"
        )
    if not croniter.is_valid(expr):
        raise ValueError(f"option 'cron' is not a valid cron expression: {expr!r}")
    return expr


def check_timezone(tz: Any) -> str:
    if not isinstance(tz, str):
        raise ValueError(f"option 'timezone' must be an IANA zone name, got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"option 'timezone' is not a known IANA zone: {tz!r}") from None
    return tz


class TimeClock(EventClock):
    """Shared loop of the time clocks: sleep until the next tick, yield it as a 1-event batch."""

    kind: ClassVar[str]

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        self._last: datetime | None = None  # last tick yielded
        self._acked: datetime | None = None  # last tick saved in the cursor

    @abstractmethod
    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    async def open(self) -> None:
        saved = self.cursor.load() or {}
        try:
            self._last = parse_time(saved["last"]) if "last" in saved else None
        except ValueError:
            self._last = None
        self._acked = self._last

    def tick_event(self, scheduled: datetime) -> RawEvent:
        when = iso(scheduled)
        return RawEvent(
            id=f"{self.name}:{when}",
            type="tick",
            occurred=when,
            payload={"scheduled": when, "clock": self.name, "kind": self.kind},
        )

    async def batches(self) -> AsyncIterator[Batch]:
        self.set_listening()
        while True:
            now = self.now()
            tick = self.next_after(max(now, self._last) if self._last else now)
            await self.sleep_until(tick)
            self._last = tick
            yield Batch(events=[self.tick_event(tick)], token=tick)

    async def sleep_until(self, when: datetime) -> None:
        """Sleep until the wall clock reaches ``when`` (in naps, to follow clock jumps)."""
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _MAX_NAP))

    async def ack(self, batch: Batch) -> None:
        tick: datetime = batch.token
        if self._acked is not None and tick <= self._acked:
            return  # an older tick acked late: the cursor is already past it
        self._acked = tick
        await asyncio.to_thread(self.cursor.save, {"last": iso(tick)})


@register
class IntervalClock(TimeClock):
    """Ticks every ``every`` (``"60s"``, ``"250ms"``, seconds...), aligned to ``anchor``."""

    type = "interval"
    kind = "interval"
    options: ClassVar[frozenset[str]] = frozenset({"every", "anchor"})

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.every = parse_duration(spec.options["every"])
        anchor = spec.options.get("anchor")
        self.anchor = EPOCH if anchor is None else parse_time(anchor)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if "every" not in options:
            raise ValueError("an interval clock needs option 'every' (e.g. every: 60s)")
        try:
            parse_duration(options["every"])
        except ValueError as exc:
            raise ValueError(f"option 'every': {exc}") from None
        if options.get("anchor") is not None:
            try:
                parse_time(options["anchor"])
            except ValueError as exc:
                raise ValueError(f"option 'anchor': {exc}") from None

    @property
    def source(self) -> str:
        every = self.spec.options["every"]
        return f"interval:{every if isinstance(every, str) else f'{every:g}s'}"

    def next_after(self, after: datetime) -> datetime:
        return next_interval_tick(after, self.every, self.anchor)


@register
class CronClock(TimeClock):
    """Ticks on a 5-field cron expression, evaluated in ``timezone`` (IANA name, default UTC)."""

    type = "cron"
    kind = "cron"
    options: ClassVar[frozenset[str]] = frozenset({"cron", "timezone"})

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.expr: str = spec.options["cron"]
        self.timezone: str = spec.options.get("timezone") or "UTC"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if "cron" not in options:
            raise ValueError("a cron clock needs option 'cron' (e.g. cron: '*/5 * * * *')")
        check_cron(options["cron"])
        if options.get("timezone") is not None:
            check_timezone(options["timezone"])

    @property
    def source(self) -> str:
        return f"cron:{self.expr}"

    def next_after(self, after: datetime) -> datetime:
        return next_cron_tick(after, self.expr, self.timezone)
