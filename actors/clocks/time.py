"""Time clocks: interval, cron and rrule. A tick is an event with id ``<clock>:<scheduled ISO>``.

Tick computation is pure (actors.clocks.schedule) so it is testable without sleeping; the
clocks only sleep until the next tick and remember the last acked one in the cursor. A
restarted clock never re-emits a tick at or before its cursor on its own; what it does with the
ticks it missed while down is its ``catchup`` policy (none, latest, all), decided on open.
"""

from __future__ import annotations

import asyncio
import logging
import re
from abc import abstractmethod
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from actors.clocks import register
from actors.clocks.base import Batch, ClockSpec, CursorStore, EventClock, RawEvent
from actors.clocks.schedule import (
    CATCHUP_POLICIES,
    DEFAULT_DTSTART,
    EPOCH,
    CatchUp,
    CronSchedule,
    IntervalSchedule,
    RRuleSchedule,
    Schedule,
    catch_up,
    compile_rrule,
    next_cron_tick,
    next_interval_tick,
    next_rrule_tick,
)
from actors.event import iso

__all__ = [
    "CronClock",
    "IntervalClock",
    "RRuleClock",
    "TimeClock",
    "next_cron_tick",
    "next_interval_tick",
    "next_rrule_tick",
    "parse_duration",
]

log = logging.getLogger(__name__)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
#: longest single sleep, so a wall-clock jump (suspend, NTP step) is noticed within a minute
_MAX_NAP = 60.0
#: options every time clock accepts
CATCHUP_OPTIONS = frozenset({"catchup", "max_catchup"})
DEFAULT_MAX_CATCHUP = 100
#: largest ``max_catchup``: the missed ticks go out as one batch
MAX_CATCHUP_LIMIT = 10_000


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
    """An aware datetime from an ISO string, datetime or date (naive means UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):  # YAML reads an unquoted 2024-01-01 as a date
        dt = datetime.combine(value, datetime.min.time())
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad ISO time {value!r}, e.g. '2024-01-01T00:00:00Z'") from None
    else:
        raise ValueError(f"time must be an ISO string, not {value!r}")
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


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


def parse_local_time(value: Any) -> datetime:
    """A datetime from an ISO string, datetime or date, naive unless it names an offset."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):  # YAML reads an unquoted 2024-01-01 as a date
        return datetime.combine(value, datetime.min.time())
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad ISO time {value!r}, e.g. '2024-01-01T09:00'") from None
    raise ValueError(f"time must be an ISO string, not {value!r}")


def check_catchup(options: dict[str, Any]) -> tuple[str, int]:
    """The ``catchup`` policy and ``max_catchup`` bound of a time clock's options."""
    policy = options.get("catchup")
    policy = "none" if policy is None else policy
    if policy not in CATCHUP_POLICIES:
        raise ValueError(
            f"option 'catchup' must be one of {', '.join(CATCHUP_POLICIES)}, got {policy!r}"
        )
    bound = options.get("max_catchup")
    bound = DEFAULT_MAX_CATCHUP if bound is None else bound
    if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_CATCHUP_LIMIT:
        raise ValueError(
            f"option 'max_catchup' must be an integer from 1 to {MAX_CATCHUP_LIMIT}, got {bound!r}"
        )
    return policy, bound


def check_rrule(options: dict[str, Any]) -> RRuleSchedule:
    """The schedule of an rrule clock's options (``rrule``, ``dtstart``, ``timezone``)."""
    text = options.get("rrule")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "option 'rrule' must be an RFC 5545 RRULE string, "
            f"e.g. 'FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=0', got {text!r}"
        )
    tz = options.get("timezone") or "UTC"
    check_timezone(tz)
    dtstart = DEFAULT_DTSTART
    if options.get("dtstart") is not None:
        try:
            dtstart = parse_local_time(options["dtstart"])
        except ValueError as exc:
            raise ValueError(f"option 'dtstart': {exc}") from None
    try:
        schedule = compile_rrule(text, dtstart, tz)
    except ValueError as exc:
        raise ValueError(f"option 'rrule' is not a valid RRULE ({exc}): {text!r}") from None
    if schedule.first() is None:
        raise ValueError(f"option 'rrule' matches no time at all: {text!r}")
    return schedule


class TimeClock(EventClock):
    """Shared loop of the time clocks: sleep until the next tick, yield it as a 1-event batch.

    On open with a cursor, the ticks missed since it are decided by the ``catchup`` policy and
    yielded first, as one batch.
    """

    kind: ClassVar[str]

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        self.catchup, self.max_catchup = check_catchup(spec.options)
        self.schedule = self.build_schedule()
        self._last: datetime | None = None  # last tick yielded
        self._acked: datetime | None = None  # last tick saved in the cursor
        self._missed: list[datetime] = []  # caught-up ticks still to yield

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        check_catchup(options)

    @abstractmethod
    def build_schedule(self) -> Schedule:
        """The pure schedule of this clock's options."""

    def next_after(self, after: datetime) -> datetime | None:
        """The first tick strictly after ``after`` (None: the schedule has ended)."""
        return self.schedule.next_after(after)

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def open(self) -> None:
        saved = self.cursor.load() or {}
        try:
            self._last = parse_time(saved["last"]) if "last" in saved else None
        except ValueError:
            self._last = None
        self._acked = self._last
        decided = await asyncio.to_thread(
            catch_up, self._last, self.now(), self.schedule, self.catchup, self.max_catchup
        )
        self._missed = decided.ticks
        self._log_catch_up(decided)

    def _log_catch_up(self, decided: CatchUp) -> None:
        if decided.dropped:
            more = "more than " if decided.dropped_at_least else ""
            log.warning(
                "clock %s: %s%d missed ticks dropped, catching up the latest %d (max_catchup)",
                self.spec.key,
                more,
                decided.dropped,
                len(decided.ticks),
            )
        if decided.ticks:
            log.info("clock %s: catching up %d missed ticks", self.spec.key, len(decided.ticks))

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
        if self._missed:
            missed, self._missed = self._missed, []
            self._last = missed[-1]
            yield Batch(events=[self.tick_event(t) for t in missed], token=missed[-1])
        while True:
            now = self.now()
            tick = self.next_after(max(now, self._last) if self._last else now)
            if tick is None:  # a finished rule: stay listening, there is nothing left to emit
                await asyncio.Event().wait()
                continue
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
        # Inline and without fsync: 10,000 interval clocks ack ~170 ticks a second, and a
        # thread hop plus an fsync each cost more than the tick itself. A tick's id is its
        # scheduled time, so a cursor an OS crash took back re-emits ticks the ledger holds.
        self.cursor.save({"last": iso(tick)}, durable=False)


@register
class IntervalClock(TimeClock):
    """Ticks every ``every`` (``"60s"``, ``"250ms"``, seconds...), aligned to ``anchor``."""

    type = "interval"
    kind = "interval"
    options: ClassVar[frozenset[str]] = frozenset({"every", "anchor"}) | CATCHUP_OPTIONS

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

    def build_schedule(self) -> IntervalSchedule:
        anchor = self.spec.options.get("anchor")
        every = parse_duration(self.spec.options["every"])
        return IntervalSchedule(every, EPOCH if anchor is None else parse_time(anchor))


@register
class CronClock(TimeClock):
    """Ticks on a 5-field cron expression, evaluated in ``timezone`` (IANA name, default UTC)."""

    type = "cron"
    kind = "cron"
    options: ClassVar[frozenset[str]] = frozenset({"cron", "timezone"}) | CATCHUP_OPTIONS

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
        return f"cron:{self.spec.options['cron']}"

    def build_schedule(self) -> CronSchedule:
        return CronSchedule(self.spec.options["cron"], self.spec.options.get("timezone") or "UTC")


@register
class RRuleClock(TimeClock):
    """Ticks on an RFC 5545 RRULE from ``dtstart``, evaluated on wall time in ``timezone``."""

    type = "rrule"
    kind = "rrule"
    options: ClassVar[frozenset[str]] = frozenset({"rrule", "dtstart", "timezone"}) | (
        CATCHUP_OPTIONS
    )

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if "rrule" not in options:
            raise ValueError(
                "an rrule clock needs option 'rrule' (e.g. rrule: 'FREQ=DAILY;BYHOUR=9;BYMINUTE=0')"
            )
        check_rrule(options)

    @property
    def source(self) -> str:
        return f"rrule:{self.spec.options['rrule']}"

    def build_schedule(self) -> RRuleSchedule:
        return check_rrule(self.spec.options)
