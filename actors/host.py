"""ListenerHost: owns many clocks as asyncio tasks and pushes their events in batches.

Each clock runs in its own task: ``open`` → ``async for batch`` → push → ``ack``. Pushes from
all clocks meet in one outbox; a single pusher drains whatever is waiting (up to ``max_batch``
events) into one coordinator call, so low load costs one hop per event and high load one hop
per thousand; ``max_inflight`` calls may await the coordinator at once. A clock acks its
source only after the coordinator confirmed the batch durable; until then the batch stays in
the outbox and is resent (same ids) when the coordinator is unavailable. A clock that crashes
is restarted with backoff; one that keeps crashing is marked ``failed`` with its last error
and retried slowly, never in a hot loop.

Once its clocks have started, a host moves them out of the cyclic garbage collector's reach
(``gc.freeze``; ``freeze_gc``). They live as long as the host, and a full collection would
otherwise walk every one of them: 100-300 ms pauses at 5,000 clocks, during which no clock
ticks on time. Reference counting still frees them when they go.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.clocks import Batch, ClockSpec, EventClock, build_clock
from actors.errors import Unavailable
from actors.event import Event
from actors.filters import EventFilter
from actors.handles import CoordinatorHandle, SourceRejection

log = logging.getLogger(__name__)

CRASHES_BEFORE_FAILED = 5
MAX_CLOCK_BACKOFF = 60.0
THROTTLE_RETRY = 0.2
MAX_BUSY_WAIT = 5.0
RETRY_LATER = ("throttled", "busy")  # not stored: pushed again, the source stays unacked
#: longest wait for every clock to leave ``starting`` before freezing the GC anyway
FREEZE_SETTLE_TIMEOUT = 30.0


@dataclass(slots=True)
class _Push:
    events: list[Event]
    rejections: list[SourceRejection]
    done: asyncio.Future[list[str]]


@dataclass(slots=True)
class ClockSlot:
    spec: ClockSpec
    clock: EventClock | None = None
    task: asyncio.Task[None] | None = None
    crashes: int = 0
    last_error: str | None = None
    failed: bool = False
    events: int = 0
    filtered: int = 0
    last_event_at: float | None = None
    filter: EventFilter | None = None

    def state_and_error(self) -> tuple[str, str | None]:
        clock = self.clock
        if clock is not None and clock.state != "starting":
            # A running clock speaks for itself, even after earlier crashes.
            return clock.state, clock.error
        if self.failed:
            return "failed", self.last_error
        if self.last_error is not None:
            return "degraded", self.last_error  # crashed; restarting with backoff
        return "starting", None

    def state(self) -> str:
        return self.state_and_error()[0]

    def describe(self) -> dict[str, Any]:
        state, error = self.state_and_error()
        return {
            "tenant": self.spec.tenant,
            "flow": self.spec.flow,
            "name": self.spec.name,
            "type": self.spec.type,
            "state": state,
            "error": error,
            "events": self.events,
            "filtered": self.filtered,
            "last_event_at": self.last_event_at,
        }


@dataclass
class ListenerHost:
    host_id: str
    specs: list[ClockSpec]
    state_dir: Path
    coordinator: CoordinatorHandle
    max_batch: int = 1000
    max_inflight: int = 2  # pushes awaiting the coordinator at once (one encodes, one claims)
    freeze_gc: bool = True
    _slots: dict[str, ClockSlot] = field(default_factory=dict, init=False)
    _outbox: asyncio.Queue[_Push] | None = field(default=None, init=False)
    _pusher: asyncio.Task[None] | None = field(default=None, init=False)
    _sending: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _started: bool = field(default=False, init=False)
    _freezer: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        """Start every clock (idempotent: a restarted host actor calls it again)."""
        if self._started:
            return
        self._started = True
        self._outbox = asyncio.Queue()
        self._pusher = asyncio.create_task(self._push_loop(), name=f"{self.host_id}-pusher")
        for spec in self.specs:
            self._add(spec)
        self._freeze_when_started()

    def _add(self, spec: ClockSpec) -> None:
        slot = ClockSlot(spec, filter=EventFilter.from_options(spec.options))
        self._slots[spec.key] = slot
        slot.task = asyncio.create_task(self._supervise(slot), name=spec.key)

    async def add_clocks(self, specs: list[ClockSpec]) -> None:
        await self.start()
        for spec in specs:
            if spec.key not in self._slots:
                self.specs.append(spec)
                self._add(spec)
        self._freeze_when_started()

    def _freeze_when_started(self) -> None:
        if not self.freeze_gc:
            return
        if self._freezer is not None:
            self._freezer.cancel()
        self._freezer = asyncio.create_task(self._freeze(), name=f"{self.host_id}-gc-freeze")

    async def _freeze(self) -> None:
        """Once no clock is ``starting`` (or after FREEZE_SETTLE_TIMEOUT): collect, freeze."""
        for _ in range(round(FREEZE_SETTLE_TIMEOUT / 0.1)):
            if not any(s.state() == "starting" for s in self._slots.values()):
                break
            await asyncio.sleep(0.1)
        gc.collect()
        gc.freeze()
        log.info(
            "%s: %d clocks started; %d objects frozen",
            self.host_id,
            len(self._slots),
            gc.get_freeze_count(),
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every clock; a clock whose library swallows the cancellation is reported
        and left behind after ``timeout`` instead of hanging the shutdown."""
        tasks = [s.task for s in self._slots.values() if s.task]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout)
            for task in stuck:
                log.error("clock %s did not stop within %.0fs", task.get_name(), timeout)
        for helper in (self._pusher, self._freezer, *self._sending):
            if helper is not None:
                helper.cancel()
                await asyncio.gather(helper, return_exceptions=True)
        self._started = False

    async def ping(self) -> dict[str, Any]:
        """The heartbeat: alive, and how many clocks are in each state (a summary, not every
        clock: a host of thousands would otherwise ship thousands of dicts every beat;
        :meth:`clocks` gives the full list on demand)."""
        await self.start()
        states: dict[str, int] = {}
        for slot in self._slots.values():
            state = slot.state()
            states[state] = states.get(state, 0) + 1
        return {
            "name": self.host_id,
            "time": time.time(),
            "pid": os.getpid(),
            "clock_count": len(self._slots),
            "clock_states": states,
            "outbox": self._outbox.qsize() if self._outbox else 0,
        }

    async def clocks(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._slots.values()]

    # -- one clock ----------------------------------------------------------------------
    async def _supervise(self, slot: ClockSlot) -> None:
        while True:
            try:
                await self._run_clock(slot)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                slot.crashes += 1
                slot.last_error = f"{type(exc).__name__}: {exc}"
                slot.failed = slot.crashes >= CRASHES_BEFORE_FAILED
                delay = min(MAX_CLOCK_BACKOFF, 0.5 * 2 ** (slot.crashes - 1))
                log.warning("clock %s crashed (%s); restart in %.1fs", slot.spec.key, exc, delay)
            finally:
                if slot.clock is not None:
                    await _close_quietly(slot.clock)
                    slot.clock = None
            await asyncio.sleep(delay)

    async def _run_clock(self, slot: ClockSlot) -> None:
        clock = build_clock(slot.spec, self.state_dir)
        slot.clock = clock
        await clock.open()
        async for batch in clock.batches():
            if len(batch):
                await self._deliver(slot, clock, batch)
            await clock.ack(batch)
            slot.crashes, slot.failed, slot.last_error = 0, False, None

    async def _deliver(self, slot: ClockSlot, clock: EventClock, batch: Batch) -> None:
        """Push until every event of the batch is durable (accepted or duplicate)."""
        spec = slot.spec
        now = time.time()
        events = [
            Event(e.id, spec.tenant, spec.flow, clock.source, e.type, e.occurred, e.payload, now)
            for e in batch.events
        ]
        rejections = [
            SourceRejection(spec.tenant, spec.flow, clock.source, r) for r in batch.rejections
        ]
        if slot.filter is not None:
            kept = [e for e in events if slot.filter.matches(e.to_dict())]
            slot.filtered += len(events) - len(kept)
            events = kept
        busy_wait = THROTTLE_RETRY
        while events or rejections:
            outcomes = await self._push(events, rejections)
            rejections = []
            retry = [(e, o) for e, o in zip(events, outcomes, strict=True) if o in RETRY_LATER]
            events = [e for e, _ in retry]
            for o in outcomes:
                if o.startswith("rejected:"):
                    log.warning("coordinator rejected an event of %s: %s", spec.key, o)
            if any(o == "busy" for _, o in retry):
                # Workers are saturated: hold the batch (unacked) and read the source more
                # slowly, backing off while the backlog stays full.
                await asyncio.sleep(busy_wait)
                busy_wait = min(MAX_BUSY_WAIT, busy_wait * 2)
            elif events:
                await asyncio.sleep(THROTTLE_RETRY)
        slot.events += len(batch.events)
        if batch.events:
            slot.last_event_at = now

    async def _push(self, events: list[Event], rejections: list[SourceRejection]) -> list[str]:
        assert self._outbox is not None
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        await self._outbox.put(_Push(events, rejections, done))
        return await done

    # -- the outbox ---------------------------------------------------------------------
    async def _push_loop(self) -> None:
        """Drain the outbox into coordinator calls, ``max_inflight`` at a time: while one
        batch is claimed, the next is gathered and encoded. Each clock awaits its own push,
        so a clock's events stay in order whatever runs beside them."""
        assert self._outbox is not None
        slots = asyncio.Semaphore(max(1, self.max_inflight))
        while True:
            items = [await self._outbox.get()]
            await slots.acquire()  # waiting here lets the next batch fill up meanwhile
            size = len(items[0].events)
            while size < self.max_batch and not self._outbox.empty():
                item = self._outbox.get_nowait()
                items.append(item)
                size += len(item.events)
            task = asyncio.create_task(self._send(items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _send(self, items: list[_Push]) -> None:
        events = [e for item in items for e in item.events]
        rejections = [r for item in items for r in item.rejections]
        delay = 0.05
        while True:
            try:
                outcomes = await self.coordinator.submit(events, rejections)
                break
            except Unavailable as exc:
                log.info("coordinator unavailable (%s); resending in %.2fs", exc, delay)
            except Exception:
                log.exception("push to coordinator failed; resending")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        start = 0
        for item in items:
            n = len(item.events)
            if not item.done.done():
                item.done.set_result(outcomes[start : start + n])
            start += n


async def _close_quietly(clock: EventClock) -> None:
    try:
        await clock.close()
    except Exception:
        log.exception("closing clock %s failed", clock.name)
