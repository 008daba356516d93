"""The coordinator: claims events in the ledger, merges schedules, dispatches runs.

Every clock's events (time ticks included: they are events with id ``<clock>:<time>``) meet
here, so schedule merging and idempotency are one mechanism: the ledger's insert-if-absent
claim. New events queue per flow; the dispatcher hands them to the least-loaded worker within
the tenant's ``max_concurrent_runs``, round-robin across flows so no tenant starves another.
Failed attempts retry with exponential backoff and jitter, then go to the dead-letter queue.

All state is rebuilt from the ledger by :meth:`start`, so the actor can be killed at any time:
``submit`` is idempotent (a resent batch only yields duplicates) and runs found ``running`` are
re-sent to the same worker with the same attempt number, which the worker deduplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from actors.backlog import QUEUE_WINDOW, FlowQueues
from actors.batching import BatchDelivery
from actors.event import Event
from actors.group_commit import GroupCommit
from actors.handles import RunOutcome, WorkerHandle
from actors.intake import Intake
from actors.ledger import Finish, FlowCounts, Ledger, RunRecord
from actors.ledger_outage import LedgerOutage
from actors.policy import FlowPolicy, TenantPolicy
from actors.quota import TokenBucket
from actors.wire import WireServed

__all__ = ["Coordinator", "FlowPolicy", "TenantPolicy"]
log = logging.getLogger(__name__)

FlowKey = tuple[str, str]
RunKey = tuple[str, str, str]


class Coordinator(Intake, BatchDelivery, FlowQueues, LedgerOutage, WireServed):
    WIRE_METHODS = frozenset({"submit_packed"})  # the hot call of hosts and the ingress

    def __init__(
        self,
        ledger: Ledger,
        workers: list[WorkerHandle],
        flows: list[FlowPolicy],
        tenants: list[TenantPolicy],
        *,
        worker_concurrency: int = 16,
        rng: Callable[[], float] = random.random,
        queue_window: int = QUEUE_WINDOW,
    ) -> None:
        if not workers:
            raise ValueError("a coordinator needs at least one worker")
        self.ledger = ledger
        self.workers = workers
        self.flows = {f.key: f for f in flows}
        self.tenants = {t.name: t for t in tenants}
        self.worker_concurrency = worker_concurrency
        self._rng = rng
        self._buckets = {t.name: TokenBucket(t.max_events_per_second) for t in tenants}
        self._queues: dict[FlowKey, deque[Event]] = {k: deque() for k in self.flows}
        # Flows with queued events, in round-robin order (a dict is an ordered set): the
        # dispatcher looks only at these, so 10,000 idle flows cost nothing per dispatch.
        self._ready: dict[FlowKey, None] = {}
        self.queue_window = max(queue_window, *(f.batch.max_events for f in flows if f.batch), 1)
        self._spilled: dict[FlowKey, int] = {}  # flow → pending events only in the ledger
        self._spill_epoch: dict[FlowKey, int] = {}
        self._refilling: set[FlowKey] = set()
        self._backlog: dict[str, int] = {}  # tenant → accepted events not yet dispatched
        self._paused: set[FlowKey] = set()
        self._inflight: dict[RunKey, asyncio.Task[None]] = {}
        self._tenant_running: dict[str, int] = dict.fromkeys(self.tenants, 0)
        self._worker_load = [0] * len(workers)
        self._timers: dict[RunKey, asyncio.TimerHandle] = {}
        self._queued_at: dict[FlowKey, float] = {}
        self._batch_timers: dict[FlowKey, asyncio.TimerHandle] = {}
        self._latencies: deque[float] = deque(maxlen=20_000)
        self._started = False
        self._stopping = False
        self._start_lock = asyncio.Lock()
        # Runs starting or finishing in the same loop turn share one ledger transaction.
        self._start_run = GroupCommit(ledger.start_many)
        self._finish_run = GroupCommit(ledger.finish)
        self._init_outage()
        self._last_counts: dict[FlowKey, FlowCounts] = {}  # what status shows in an outage

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Rebuild from the ledger (idempotent): paused flows, queued, retrying, running runs."""
        async with self._start_lock:
            if self._started:
                return
            self._paused = set(await self.ledger.paused())
            now = time.time()
            # Pending events stay in the ledger and are paged in by ``_refill``.
            for fkey, counts in (await self.ledger.counts()).items():
                waiting = counts.runs.get("pending", 0)
                if waiting and fkey in self.flows:
                    self._spill(fkey, waiting)
                    self._backlog[fkey[0]] = self._backlog.get(fkey[0], 0) + waiting
            running_batches: dict[str, list[RunRecord]] = {}
            for rec in await self.ledger.open_runs(include_pending=False):
                if rec.state.value == "running" and rec.batch:
                    running_batches.setdefault(rec.batch, []).append(rec)
                else:
                    self._restore(rec, now)
            for bid, recs in running_batches.items():
                self._restore_batch(bid, recs)
            self._started = True
        for fkey in list(self._spilled):
            self._maybe_refill(fkey)
        self._pump()

    def _restore(self, rec: RunRecord, now: float) -> None:
        ev = rec.event
        if ev.key[:2] not in self.flows:
            log.warning("ledger holds a run of unconfigured flow %s/%s; left alone", *ev.key[:2])
            return
        if rec.state.value == "failed":
            self._schedule_retry(ev, max(0.0, (rec.next_at or now) - now))
        else:  # running when the previous coordinator died: re-send, same worker and attempt
            worker = rec.worker if rec.worker is not None and rec.worker < len(self.workers) else 0
            self._launch(ev, worker, started=(rec.attempts, rec.series))

    async def stop(self, drain_timeout: float = 30.0) -> int:
        """Stop dispatching; wait up to ``drain_timeout`` for running attempts. Returns how
        many were still running (they stay ``running`` in the ledger and resume on restart)."""
        self._stopping = True
        await self.close_wire()
        for timer in [*self._timers.values(), *self._batch_timers.values()]:
            timer.cancel()
        self._timers.clear()
        self._batch_timers.clear()
        if self._recovering is not None:
            self._recovering.cancel()
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            return len(pending)
        return 0

    async def ping(self) -> dict[str, Any]:
        await self.start()
        return {
            "name": "coordinator",
            "time": time.time(),
            "pid": os.getpid(),
            "inflight": len(self._inflight),
            "queued": sum(len(q) for q in self._queues.values()),
            "backlog": sum(self._backlog.values()),
            "ledger_ok": self.ledger_ok,
            "ledger_outages": self.ledger_outages,
        }

    # -- dispatch -----------------------------------------------------------------------
    def _pump(self) -> None:
        """Start as many queued runs as tenants' quotas and workers' capacity allow."""
        if self._stopping or not self._started or not self.ledger_ok:
            return
        progress = True
        while progress:
            progress = False
            for fkey in list(self._ready):  # one event per ready flow per round: fair
                if fkey not in self._ready or fkey in self._paused or self._tenant_full(fkey[0]):
                    continue
                worker = self._pick_worker()
                if worker is None:
                    return
                if self._dispatch(fkey, worker):
                    progress = True
                    if fkey in self._ready:  # to the back of the round
                        del self._ready[fkey]
                        self._ready[fkey] = None

    def _tenant_full(self, tenant: str) -> bool:
        policy = self.tenants.get(tenant)
        limit = policy.max_concurrent_runs if policy else 8
        return self._tenant_running.get(tenant, 0) >= limit

    def _dispatch(self, fkey: FlowKey, worker: int) -> bool:
        """Start one run of ``fkey`` (an event, or a batch once it is due); True if started."""
        batch = self.flows[fkey].batch
        if batch is None:
            ev = self._take(fkey)
            if ev.key in self._inflight:
                return False
            self._launch(ev, worker)
            return True
        return self._dispatch_batch(fkey, batch, worker)

    def _pick_worker(self) -> int | None:
        load = min(self._worker_load)
        if load >= self.worker_concurrency:
            return None
        return self._worker_load.index(load)

    def _launch(self, ev: Event, worker: int, started: tuple[int, int] | None = None) -> None:
        self._worker_load[worker] += 1
        self._tenant_running[ev.tenant] = self._tenant_running.get(ev.tenant, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(ev, worker, started))
        self._inflight[ev.key] = task

    async def _run(self, ev: Event, worker: int, started: tuple[int, int] | None) -> None:
        try:
            if started is None:
                try:
                    started = await self._start_run((ev.key, worker))
                except Exception as exc:
                    self._requeue(ev)
                    self._ledger_failed("starting a run", exc)
                    return
                if started is None:
                    return  # completed, dead or running elsewhere: nothing to start
            attempt, series = started
            outcome = await self._call_worker(worker, ev, attempt, series)
            if outcome.ok and ev.received:
                self._latencies.append(outcome.started_at - ev.received)
            await self._record(ev, attempt, outcome)
        except Exception:
            log.exception("dispatch of %s failed; it stays in the ledger", ev.key)
        finally:
            self._worker_load[worker] -= 1
            self._tenant_running[ev.tenant] -= 1
            self._inflight.pop(ev.key, None)
            self._pump()

    async def _call_worker(self, worker: int, ev: Event, attempt: int, series: int) -> RunOutcome:
        try:
            return await self.workers[worker].run(ev.to_dict(), attempt, series)
        except Exception as exc:  # an in-process worker raising: same as a failed attempt
            return RunOutcome(
                ok=False,
                error=f"worker {worker} failed: {type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )

    async def _record(self, ev: Event, attempt: int, outcome: RunOutcome) -> None:
        policy = self.flows[ev.key[:2]]
        retry_at = None
        delay = 0.0
        if not outcome.ok and attempt <= policy.retries:
            delay = policy.backoff(attempt, self._rng)
            retry_at = time.time() + delay
        fresh = await self._finish_recorded(
            Finish(
                key=ev.key,
                attempt=attempt,
                ok=outcome.ok,
                error=outcome.error,
                traceback=outcome.traceback,
                prefect_flow_run_id=outcome.prefect_flow_run_id,
                retry_at=retry_at,
            )
        )
        if fresh and retry_at is not None:
            self._schedule_retry(ev, delay)
        elif fresh and not outcome.ok:
            log.warning("event %s dead after %d attempts: %s", ev.key, attempt, outcome.error)

    def _schedule_retry(self, ev: Event, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[ev.key] = loop.call_later(delay, self._retry_due, ev)

    def _retry_due(self, ev: Event) -> None:
        self._timers.pop(ev.key, None)
        self._enqueue(ev, in_memory=True)
        self._pump()

    # -- control ------------------------------------------------------------------------
    def _flow_key(self, tenant: str, flow: str) -> FlowKey:
        key = (tenant, flow)
        if key not in self.flows:
            raise KeyError(f"unknown flow {tenant}/{flow}")
        return key

    async def pause(self, tenant: str, flow: str) -> None:
        await self.start()
        key = self._flow_key(tenant, flow)
        await self.ledger.set_paused(tenant, flow, True)
        self._paused.add(key)

    async def resume(self, tenant: str, flow: str) -> None:
        await self.start()
        key = self._flow_key(tenant, flow)
        await self.ledger.set_paused(tenant, flow, False)
        self._paused.discard(key)
        self._maybe_refill(key)
        self._pump()

    async def replay(self, event_ids: list[str] | None = None) -> list[str]:
        """Re-run dead letters (all when ``event_ids`` is empty); returns the replayed keys."""
        await self.start()
        keys: list[RunKey] | None = None
        if event_ids:
            wanted = set(event_ids)
            dead = await self.ledger.runs(state="dead", limit=1_000_000)
            keys = [r.key for r in dead if r.event.id in wanted or "/".join(r.key) in wanted]
        events = await self.ledger.replay(keys)
        for ev in events:
            if ev.key[:2] in self._queues:
                self._enqueue(ev)
        self._pump()
        return ["/".join(ev.key) for ev in events]

    async def status(self) -> dict[str, Any]:
        """Per flow counts and state. While the ledger cannot be read, the counts are the
        last ones read and ``ledger`` says why (``ok`` is false during an outage too)."""
        await self.start()
        error = None
        try:
            counts = self._last_counts = await self.ledger.counts()
        except Exception as exc:
            counts, error = self._last_counts, f"{type(exc).__name__}: {exc}"
        flows = []
        for key in self.flows:
            c = counts.get(key) or FlowCounts()
            flows.append(
                {
                    "tenant": key[0],
                    "flow": key[1],
                    "paused": key in self._paused,
                    "queued": len(self._queues[key]) + self._spilled.get(key, 0),
                    "events": c.events,
                    "rejected_by_reason": c.rejected_by_reason,
                    "runs": c.runs,
                    "last_event_at": c.last_event_at,
                }
            )
        ledger = {"ok": error is None and self.ledger_ok, "outages": self.ledger_outages}
        return {"flows": flows, "ledger": {**ledger, **({"error": error} if error else {})}}

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        await self.start()
        return [r.to_dict() for r in await self.ledger.runs(tenant, flow, state, limit)]

    async def latencies(self, clear: bool = False) -> list[float]:
        """Event received → flow started, seconds, for recent successful runs (benchmarks)."""
        out = list(self._latencies)
        if clear:
            self._latencies.clear()
        return out
