"""Pure schedule math of the time clocks: next ticks, RRULEs, and the catch-up decision.

Nothing here sleeps or reads the wall clock: every function takes the times it needs, so the
whole module is testable with fixed datetimes. All ticks are aware UTC datetimes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import ClassVar
from zoneinfo import ZoneInfo

from croniter import croniter
from dateutil.rrule import rrule, rrulestr

__all__ = [
    "CATCHUP_POLICIES",
    "DEFAULT_DTSTART",
    "EPOCH",
    "CatchUp",
    "CronSchedule",
    "IntervalSchedule",
    "RRuleSchedule",
    "Schedule",
    "catch_up",
    "compile_rrule",
    "missed_ticks",
    "next_cron_tick",
    "next_interval_tick",
    "next_rrule_tick",
]

UTC = UTC
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: wall-clock start of an RRULE without ``dtstart`` (in the clock's timezone)
DEFAULT_DTSTART = datetime(2000, 1, 1)
CATCHUP_POLICIES = ("none", "latest", "all")
_ONE_US = timedelta(microseconds=1)
#: most ticks counted one by one just to report how many a bounded catch-up dropped
COUNT_LIMIT = 5_000


def next_interval_tick(after: datetime, every: float, anchor: datetime = EPOCH) -> datetime:
    """The first ``anchor + k*every`` strictly after ``after`` (UTC; microsecond arithmetic)."""
    step_us = max(1, round(every * 1_000_000))
    elapsed_us = (after - anchor) // _ONE_US
    k = elapsed_us // step_us + 1
    return (anchor + timedelta(microseconds=k * step_us)).astimezone(UTC)


def next_cron_tick(after: datetime, expr: str, tz: str = "UTC") -> datetime:
    """The first time strictly after ``after`` matching ``expr`` in zone ``tz``, in UTC."""
    local = after.astimezone(ZoneInfo(tz))
    tick = croniter(expr, local).get_next(datetime)
    if tick <= after:  # croniter truncates sub-seconds; never return a tick at or before ``after``
        tick = croniter(expr, tick).get_next(datetime)
    return tick.astimezone(UTC)


class Schedule(ABC):
    """A set of tick times. ``next_after`` is the only primitive; the rest derive from it."""

    #: ``count_between`` is exact at any size (else it stops counting at its ``limit``)
    exact_count: ClassVar[bool] = False

    @abstractmethod
    def next_after(self, after: datetime) -> datetime | None:
        """The first tick strictly after ``after``, or None when the schedule has ended."""

    def ticks_between(self, lo: datetime, hi: datetime, limit: int | None = None) -> list[datetime]:
        """Ticks in ``(lo, hi]``, oldest first, at most ``limit`` of them (the oldest)."""
        out: list[datetime] = []
        tick = self.next_after(lo)
        while tick is not None and tick <= hi and (limit is None or len(out) < limit):
            out.append(tick)
            tick = self.next_after(tick)
        return out

    def count_between(self, lo: datetime, hi: datetime, limit: int = COUNT_LIMIT) -> int:
        """How many ticks lie in ``(lo, hi]``, counting at most ``limit``."""
        return len(self.ticks_between(lo, hi, limit))


@dataclass(frozen=True)
class IntervalSchedule(Schedule):
    every: float  # seconds
    anchor: datetime = EPOCH
    exact_count: ClassVar[bool] = True

    def next_after(self, after: datetime) -> datetime:
        return next_interval_tick(after, self.every, self.anchor)

    def count_between(self, lo: datetime, hi: datetime, limit: int = COUNT_LIMIT) -> int:
        # Exact and O(1): the grid index of the last tick <= hi minus that of the last <= lo.
        step_us = max(1, round(self.every * 1_000_000))
        index_hi = ((hi - self.anchor) // _ONE_US) // step_us
        index_lo = ((lo - self.anchor) // _ONE_US) // step_us
        return max(0, index_hi - index_lo)


@dataclass(frozen=True)
class CronSchedule(Schedule):
    expr: str
    tz: str = "UTC"

    def next_after(self, after: datetime) -> datetime:
        return next_cron_tick(after, self.expr, self.tz)


# --- RRULE -----------------------------------------------------------------------------------

#: the period an RRULE's FREQ repeats on, for rebasing its start (MONTHLY/YEARLY use years)
_FREQ_STEP = {
    "SECONDLY": timedelta(seconds=1),
    "MINUTELY": timedelta(minutes=1),
    "HOURLY": timedelta(hours=1),
    "DAILY": timedelta(days=1),
    "WEEKLY": timedelta(weeks=1),
}


def _rrule_parts(text: str) -> dict[str, str]:
    body = text.strip()
    if body.upper().startswith("RRULE:"):
        body = body[len("RRULE:") :]
    if not body or "\n" in body or ":" in body:
        raise ValueError(
            "must be one RRULE such as 'FREQ=WEEKLY;BYDAY=MO;BYHOUR=9' (put the start in "
            "option 'dtstart'; DTSTART, EXDATE and RDATE lines are not supported)"
        )
    parts: dict[str, str] = {}
    for item in body.split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not a NAME=VALUE part")
        parts[key.strip().upper()] = value.strip().upper()
    return parts


@lru_cache(maxsize=256)
def compile_rrule(text: str, dtstart: datetime, tz: str = "UTC") -> RRuleSchedule:
    """Parse an RRULE for wall-clock ``dtstart`` (naive, or converted) in zone ``tz``.

    Raises ``ValueError`` with a readable reason for anything dateutil would reject (or would
    loop forever on, like ``INTERVAL=0``).
    """
    zone = ZoneInfo(tz)
    start = (dtstart.astimezone(zone) if dtstart.tzinfo else dtstart.replace(tzinfo=zone)).replace(
        microsecond=0
    )
    parts = _rrule_parts(text)
    if "FREQ" not in parts:
        raise ValueError("needs a FREQ part (SECONDLY ... YEARLY)")
    interval = parts.get("INTERVAL", "1")
    if not interval.isdigit() or int(interval) < 1:
        raise ValueError(f"INTERVAL must be a positive integer, got {interval!r}")
    until = parts.get("UNTIL", "Z")
    if not until.endswith("Z"):
        raise ValueError(
            f"UNTIL must be a UTC time ending in Z (e.g. 20301231T000000Z), not {until}"
        )
    try:
        rule = rrulestr(text.strip(), dtstart=start, unfold=False)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(rule, rrule):  # pragma: no cover - excluded by _rrule_parts
        raise ValueError("must be a single RRULE")
    return RRuleSchedule(
        rule=rule,
        dtstart=start,
        tz=tz,
        freq=parts["FREQ"],
        interval=int(interval),
        rebase="COUNT" not in parts,
    )


def next_rrule_tick(
    after: datetime, rule: str, dtstart: datetime = DEFAULT_DTSTART, tz: str = "UTC"
) -> datetime | None:
    """The first occurrence of RRULE ``rule`` strictly after ``after``, in UTC (None: ended)."""
    return compile_rrule(rule, dtstart, tz).next_after(after)


def wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant whose local time in ``zone`` is at or after the wall time ``wall``.

    An ambiguous wall time (clocks turned back) is its first occurrence; a wall time skipped by
    a forward jump is the instant of the jump. The mapping never decreases, so ticks keep their
    order.
    """
    naive = wall.replace(tzinfo=None)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    lo = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)  # before the jump
    hi, offset = first, first.astimezone(zone).utcoffset()  # after the jump
    while hi - lo > _ONE_US:
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).utcoffset() == offset:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True, eq=False)
class RRuleSchedule(Schedule):
    """An RRULE evaluated on wall-clock time in ``tz`` (``compile_rrule`` builds it)."""

    rule: rrule
    dtstart: datetime  # aware, in ``tz``
    tz: str
    freq: str
    interval: int
    rebase: bool = True  # start the search near ``after`` instead of at dtstart (no COUNT)
    zone: ZoneInfo = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", ZoneInfo(self.tz))

    def _rule_near(self, wall: datetime) -> rrule:
        """The same rule, restarted a whole number of periods after dtstart but before ``wall``.

        dateutil walks every occurrence from dtstart; a minutely rule from 2000 would take
        seconds per tick otherwise. Shifting dtstart by whole ``INTERVAL`` periods keeps every
        occurrence from the new start on (defaults taken from dtstart's fields are unchanged).
        """
        start = self.dtstart
        if not self.rebase or wall <= start:
            return self.rule
        if self.freq in _FREQ_STEP:
            period = _FREQ_STEP[self.freq] * self.interval
            periods = (wall.replace(tzinfo=None) - start.replace(tzinfo=None)) // period - 1
            shifted = start + period * periods if periods > 0 else start
        else:  # MONTHLY, YEARLY: shift by whole years that are a multiple of INTERVAL
            years = (wall.year - start.year - 1) // self.interval * self.interval
            try:
                shifted = start.replace(year=start.year + years) if years > 0 else start
            except ValueError:  # 29 February
                shifted = start
        return self.rule if shifted == start else self.rule.replace(dtstart=shifted)

    def first(self) -> datetime | None:
        """The first occurrence at or after dtstart (None: the rule matches no time at all)."""
        occurrence = self.rule.after(self.dtstart, inc=True)
        return None if occurrence is None else wall_to_utc(occurrence, self.zone)

    def next_after(self, after: datetime) -> datetime | None:
        wall = after.astimezone(self.zone)
        # Every occurrence before ``wall`` maps to an instant <= after, so start there.
        for occurrence in self._rule_near(wall).xafter(wall, inc=True):
            tick = wall_to_utc(occurrence, self.zone)
            if tick > after:
                return tick
        return None


# --- catch-up --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatchUp:
    """Missed ticks to emit on open, oldest first, and how many of them were left out."""

    ticks: list[datetime] = field(default_factory=list)
    dropped: int = 0
    dropped_at_least: bool = False  # ``dropped`` stopped counting at COUNT_LIMIT


def _latest_ticks(
    schedule: Schedule, cursor: datetime, now: datetime, keep: int
) -> tuple[list[datetime], datetime, int]:
    """The last ``keep`` ticks in ``(cursor, now]``: (ticks, window start, ticks in window).

    Widens a window back from ``now`` (doubling) until it holds ``keep`` ticks or reaches the
    cursor, so a long outage costs about ``keep`` tick computations, not one per missed tick.
    """
    width = timedelta(milliseconds=1)
    while True:
        lo = cursor if now - cursor <= width else now - width
        window: deque[datetime] = deque(maxlen=keep)
        seen = 0
        tick = schedule.next_after(lo)
        while tick is not None and tick <= now:
            window.append(tick)
            seen += 1
            tick = schedule.next_after(tick)
        if seen >= keep or lo == cursor:
            return list(window), lo, seen
        width *= 2


def catch_up(
    cursor: datetime | None,
    now: datetime,
    schedule: Schedule,
    policy: str,
    max_catchup: int | None = 100,
) -> CatchUp:
    """Which ticks a clock missed while it was down, and should emit before ticking on.

    Missed ticks are the scheduled times strictly after ``cursor`` (the last acked tick) and at
    or before ``now``. ``none``: none of them; ``latest``: the most recent one; ``all``: all of
    them, oldest first, but only the most recent ``max_catchup`` (None: no bound). Without a
    cursor (a first start) nothing was missed.
    """
    if policy not in CATCHUP_POLICIES:
        raise ValueError(f"catch-up policy must be one of {', '.join(CATCHUP_POLICIES)}")
    if cursor is None or policy == "none" or now <= cursor:
        return CatchUp()
    if policy == "all" and max_catchup is None:
        return CatchUp(schedule.ticks_between(cursor, now))
    keep = 1 if policy == "latest" else max_catchup
    assert keep is not None
    ticks, lo, seen = _latest_ticks(schedule, cursor, now, keep)
    if policy == "latest":
        return CatchUp(ticks)
    before = schedule.count_between(cursor, lo) if lo > cursor else 0
    capped = not schedule.exact_count and before >= COUNT_LIMIT
    return CatchUp(ticks, dropped=seen - len(ticks) + before, dropped_at_least=capped)


def missed_ticks(
    cursor: datetime | None,
    now: datetime,
    schedule: Schedule,
    policy: str,
    max_catchup: int | None = 100,
) -> list[datetime]:
    """The ticks of :func:`catch_up`, without the count of dropped ones."""
    return catch_up(cursor, now, schedule, policy, max_catchup).ticks
