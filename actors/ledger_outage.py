"""Riding out a ledger that stops answering (a PostgreSQL or Redis restart, a lost connection).

The coordinator's dispatch path writes to the ledger twice a run: when the run starts and when
its outcome is recorded. When either write fails, the coordinator goes into an outage:

- it dispatches nothing new (a run cannot start without its ledger row saying so);
- a run whose start failed goes back to the front of its flow's queue (it is still pending
  in the ledger, or, if the failed call did commit, running there: see reconciling below);
- an outcome that could not be recorded waits in memory and is written again once the ledger
  answers (the run's worker slot stays taken meanwhile);
- every ``OUTAGE_RETRY_MIN`` to ``OUTAGE_RETRY_MAX`` seconds (doubling) it reconciles with the
  ledger; the first reconcile that succeeds ends the outage.

Reconciling reads the runs the ledger holds ``running`` or ``failed`` and restores each one the
coordinator has no task or timer for, as a restart would: a run whose start committed although
its call failed is re-sent to its worker with the same attempt (which the worker
deduplicates); a failed run gets its retry timer unless its retry is queued already. Flows
whose paging from the ledger failed page again. So nothing is lost and nothing is left
half-done, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors.event import Event
from actors.ledger import Finish, RunRecord

log = logging.getLogger(__name__)

OUTAGE_RETRY_MIN = 0.2
OUTAGE_RETRY_MAX = 5.0


class LedgerOutage:
    """Mixin of :class:`actors.coordinator.Coordinator` (whose ledger, queues and dispatch
    bookkeeping it uses). ``_pump`` dispatches only while :attr:`ledger_ok`."""

    def _init_outage(self: Any) -> None:
        self._ledger_back = asyncio.Event()
        self._ledger_back.set()
        self._recovering: asyncio.Task[None] | None = None
        self.ledger_outages = 0

    @property
    def ledger_ok(self: Any) -> bool:
        return bool(self._ledger_back.is_set())

    def _ledger_failed(self: Any, doing: str, exc: BaseException) -> None:
        """A ledger call on the dispatch path failed: stop dispatching until it answers."""
        if self.ledger_ok:
            self.ledger_outages += 1
            log.warning(
                "ledger failed while %s (%s: %s); dispatch waits until it answers again",
                doing,
                type(exc).__name__,
                exc,
            )
        self._ledger_back.clear()
        if (self._recovering is None or self._recovering.done()) and not self._stopping:
            self._recovering = asyncio.get_running_loop().create_task(self._recover_ledger())

    async def _recover_ledger(self: Any) -> None:
        delay = OUTAGE_RETRY_MIN
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._reconcile()
            except Exception as exc:
                log.debug("ledger still failing: %s: %s", type(exc).__name__, exc)
                delay = min(delay * 2, OUTAGE_RETRY_MAX)
                continue
            log.warning("ledger answers again; dispatch resumes")
            self._ledger_back.set()
            self._pump()
            return

    async def _reconcile(self: Any) -> None:
        """Restore every open run of the ledger that this coordinator has lost track of."""
        records = await self.ledger.open_runs(include_pending=False)
        queued = {ev.key for queue in self._queues.values() for ev in queue}
        now = time.time()
        batches: dict[str, list[RunRecord]] = {}
        for rec in records:
            key = rec.event.key
            if key in self._inflight or key in self._timers:
                continue
            if rec.state.value == "failed" and key in queued:
                continue  # its retry is queued already
            # A running run also queued here: its start failed, yet committed. Restored, its
            # queue entry is skipped at dispatch (in flight) or finds nothing to start.
            if rec.state.value == "running" and rec.batch:
                batches.setdefault(rec.batch, []).append(rec)
            else:
                log.info("restoring %s run %s after the ledger outage", rec.state.value, key)
                self._restore(rec, now)
        for bid, recs in batches.items():
            self._restore_batch(bid, recs)
        for fkey in list(self._spilled):
            self._maybe_refill(fkey)

    def _requeue(self: Any, ev: Event) -> None:
        """Put an event whose start failed back at the front of its flow's queue."""
        fkey = ev.key[:2]
        queue = self._queues[fkey]
        self._backlog[ev.tenant] = self._backlog.get(ev.tenant, 0) + 1
        if not queue:
            self._queued_at[fkey] = time.monotonic()
            self._ready[fkey] = None
        queue.appendleft(ev)

    async def _finish_recorded(self: Any, finish: Finish) -> bool:
        """Record a run's outcome, waiting out a ledger outage; True if this call changed the
        run (False: it had been recorded already). Raises only if the coordinator stops
        first: the run then stays ``running`` and is re-sent on restart."""
        failed = False
        while True:
            try:
                fresh = bool(await self._finish_run(finish))
            except Exception as exc:
                if self._stopping:
                    raise
                failed = True
                self._ledger_failed("recording a run's outcome", exc)
                await self._ledger_back.wait()
                continue
            # After a failed call, "already recorded" means that call committed after all.
            return fresh or failed
