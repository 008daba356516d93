"""Delivery policy ``batch``: one flow run receives several events under one batch id.

Members keep their own ledger rows (one claim, one state, one attempt count each), so
exactly-once holds per member; the batch id is derived from the member ids, recorded on each
member while it runs, and lets a restarted coordinator re-send the same batch to the same
worker, which joins the run already in flight instead of starting it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.event import Event, utcnow_iso
from actors.handles import RunOutcome

if TYPE_CHECKING:
    from actors.ledger import RunRecord

log = logging.getLogger(__name__)
FlowKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_events: int = 100
    max_wait: float = 1.0  # seconds the oldest waiting event may wait for the batch to fill

    def ready(self, queued: int, oldest_waited: float) -> bool:
        return queued >= self.max_events or (queued > 0 and oldest_waited >= self.max_wait)


def batch_id(members: list[Event]) -> str:
    """Stable for the same set of members, whatever their order."""
    digest = hashlib.sha256("\n".join(sorted(m.id for m in members)).encode()).hexdigest()
    return f"batch:{digest[:32]}"


def batch_event(bid: str, members: list[Event]) -> dict[str, Any]:
    """What the flow's event parameter receives: the members under ``payload.events``."""
    first = members[0]
    return {
        "id": bid,
        "tenant": first.tenant,
        "flow": first.flow,
        "source": "batch",
        "type": "batch",
        "occurred": utcnow_iso(),
        "payload": {"events": [m.to_dict() for m in members], "size": len(members)},
    }


class BatchDelivery:
    """The coordinator's batch dispatch (a mixin of :class:`actors.coordinator.Coordinator`,
    whose queues, ledger, workers and bookkeeping it uses)."""

    def _dispatch_batch(self: Any, fkey: FlowKey, batch: BatchPolicy, worker: int) -> bool:
        queue = self._queues[fkey]
        waited = time.monotonic() - self._queued_at.get(fkey, time.monotonic())
        if not batch.ready(len(queue), waited):
            self._wake_batch_later(fkey, batch.max_wait - waited)
            return False
        members: list[Event] = []
        while queue and len(members) < batch.max_events:
            ev = self._take(fkey)
            if ev.key not in self._inflight and all(m.key != ev.key for m in members):
                members.append(ev)
        if queue:
            self._queued_at[fkey] = time.monotonic()
        if not members:
            return False
        self._launch_batch(members, worker, batch_id(members))
        return True

    def _wake_batch_later(self: Any, fkey: FlowKey, delay: float) -> None:
        if fkey not in self._batch_timers:
            loop = asyncio.get_running_loop()

            def due() -> None:
                self._batch_timers.pop(fkey, None)
                self._pump()

            self._batch_timers[fkey] = loop.call_later(max(0.0, delay), due)

    def _restore_batch(self: Any, bid: str, recs: list[RunRecord]) -> None:
        """A batch that was running when the previous coordinator died: the same members,
        batch id, worker and attempts, so the worker joins the run if it is still going."""
        recs = [r for r in recs if r.event.key[:2] in self.flows]
        if not recs:
            return
        worker = recs[0].worker if (recs[0].worker or 0) < len(self.workers) else 0
        started = [(r.attempts, r.series) for r in recs]
        self._launch_batch([r.event for r in recs], worker or 0, bid, started)

    def _launch_batch(
        self: Any,
        members: list[Event],
        worker: int,
        bid: str,
        started: list[tuple[int, int]] | None = None,
    ) -> None:
        self._worker_load[worker] += 1
        tenant = members[0].tenant
        self._tenant_running[tenant] = self._tenant_running.get(tenant, 0) + 1
        task = asyncio.get_running_loop().create_task(
            self._run_batch(members, worker, bid, started)
        )
        for m in members:
            self._inflight[m.key] = task

    async def _run_batch(
        self: Any,
        members: list[Event],
        worker: int,
        bid: str,
        started: list[tuple[int, int]] | None,
    ) -> None:
        try:
            if started is None:
                try:
                    got = await self.ledger.start_batch([m.key for m in members], worker, bid)
                except Exception as exc:
                    for m in reversed(members):
                        self._requeue(m)
                    self._ledger_failed("starting a batch run", exc)
                    return
                pairs = [(m, s) for m, s in zip(members, got, strict=True) if s is not None]
            else:
                pairs = list(zip(members, started, strict=True))
            if not pairs:
                return
            attempt = max(s[0] for _, s in pairs)
            series = max(s[1] for _, s in pairs)
            event = batch_event(bid, [m for m, _ in pairs])
            try:
                outcome = await self.workers[worker].run(event, attempt, series)
            except Exception as exc:
                outcome = RunOutcome(ok=False, error=f"worker {worker} failed: {exc}")
            for m, (member_attempt, _) in pairs:
                await self._record(m, member_attempt, outcome)
        except Exception:
            log.exception("dispatch of batch %s failed; its members stay in the ledger", bid)
        finally:
            self._worker_load[worker] -= 1
            self._tenant_running[members[0].tenant] -= 1
            for m in members:
                self._inflight.pop(m.key, None)
            self._pump()
