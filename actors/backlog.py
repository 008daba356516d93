"""Per-flow run queues with a bounded memory window, paged from the ledger.

A coordinator holds at most ``QUEUE_WINDOW`` queued events per flow. A longer backlog (a
paused flow, saturated workers, a restart over a big ledger) waits only in the ledger, where
it is durable already, and is paged back in, oldest first, as the queue drains: memory stays
bounded whatever the backlog. Each tenant's backlog (in memory plus in the ledger) is counted,
so the coordinator can answer ``busy`` (backpressure) once it reaches ``max_pending_runs``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors.claims import FlowBatch
from actors.event import Event

log = logging.getLogger(__name__)
FlowKey = tuple[str, str]

# Events of one flow held in memory, ready to dispatch; a longer backlog waits in the ledger
# (it is durable there already) and is paged back in as the queue drains.
QUEUE_WINDOW = 2_000


class FlowQueues:
    """Mixin of :class:`actors.coordinator.Coordinator` (whose ``_queues``, ``_ready``,
    ``_spilled``, ``_backlog``, ledger and dispatcher it uses)."""

    def _enqueue(self: Any, ev: Event, *, in_memory: bool = False) -> None:
        """Queue a pending event. Past the flow's window it stays only in the ledger (it is
        durable there) unless ``in_memory``: a retry is ``failed`` in the ledger, where
        ``pending`` paging would not find it."""
        fkey = ev.key[:2]
        queue = self._queues[fkey]
        self._backlog[ev.tenant] = self._backlog.get(ev.tenant, 0) + 1
        if not in_memory and (fkey in self._spilled or len(queue) >= self.queue_window):
            self._spill(fkey, 1)
            return
        if not queue:
            self._queued_at[fkey] = time.monotonic()
            self._ready[fkey] = None
        queue.append(ev)

    def _enqueue_new(self: Any, batch: FlowBatch, positions: list[int]) -> None:
        """``_enqueue`` for the new events of one run (at ``positions`` of ``batch``), in
        order: those that fit in the window are decoded and join the queue, the rest stay
        in the ledger, never decoded here (one spill for all of them)."""
        fkey = batch.key
        queue = self._queues[fkey]
        self._backlog[fkey[0]] = self._backlog.get(fkey[0], 0) + len(positions)
        room = 0 if fkey in self._spilled else max(0, self.queue_window - len(queue))
        if room and positions:
            if not queue:
                self._queued_at[fkey] = time.monotonic()
                self._ready[fkey] = None
            queue.extend(batch.events(positions[:room]))
        if len(positions) > room:
            self._spill(fkey, len(positions) - room)

    def _take(self: Any, fkey: FlowKey) -> Event:
        """The next queued event of ``fkey`` (the caller checked the queue is not empty)."""
        queue = self._queues[fkey]
        ev = queue.popleft()
        self._backlog[ev.tenant] -= 1
        if not queue:
            self._ready.pop(fkey, None)
        self._maybe_refill(fkey)
        return ev

    def _spill(self: Any, fkey: FlowKey, n: int) -> None:
        self._spilled[fkey] = self._spilled.get(fkey, 0) + n
        self._spill_epoch[fkey] = self._spill_epoch.get(fkey, 0) + 1

    def _maybe_refill(self: Any, fkey: FlowKey) -> None:
        if (
            fkey in self._spilled
            and fkey not in self._refilling
            and len(self._queues[fkey]) <= self.queue_window // 2
            and not self._stopping
        ):
            self._refilling.add(fkey)
            asyncio.get_running_loop().create_task(self._refill(fkey))

    async def _refill(self: Any, fkey: FlowKey) -> None:
        """Page a spilled flow's oldest pending events from the ledger into its queue."""
        try:
            queue = self._queues[fkey]
            epoch = self._spill_epoch.get(fkey, 0)
            # Rows still ``pending`` may be queued here or dispatched and not yet started
            # (their start commits with the next group): ask for enough to get past them.
            inflight = [k for k in self._inflight if k[:2] == fkey]
            limit = len(queue) + len(inflight) + self.queue_window
            rows = await self.ledger.pending(fkey[0], fkey[1], limit)
            have = {ev.key for ev in queue} | set(inflight)
            fresh = [ev for ev in rows if ev.key not in have]
            room = max(0, self.queue_window - len(queue))
            for ev in fresh[:room]:
                if not queue:
                    self._queued_at[fkey] = time.monotonic()
                    self._ready[fkey] = None
                queue.append(ev)
            moved = min(len(fresh), room)
            if len(rows) < limit and moved == len(fresh) and epoch == self._spill_epoch.get(fkey):
                # The ledger has nothing more for this flow beyond what is now in memory.
                self._spilled.pop(fkey, None)
            else:
                self._spilled[fkey] = max(1, self._spilled.get(fkey, 0) - moved)
        except Exception as exc:
            self._ledger_failed(f"paging pending events of {fkey[0]}/{fkey[1]}", exc)
        finally:
            self._refilling.discard(fkey)
        self._pump()
