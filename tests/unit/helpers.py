"""Shared test helpers: condition waits, event builders and small in-process fakes of peers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.errors import Unavailable
from actors.event import Event
from actors.handles import RunOutcome, SourceRejection, WorkerHandle
from actors.ledger import SQLiteLedger

Condition = Callable[[], bool | Awaitable[bool]]


async def wait_for(cond: Condition, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``cond`` (sync or async) until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {cond}")
        await asyncio.sleep(interval)


def make_event(
    event_id: str,
    tenant: str = "acme",
    flow: str = "ingest",
    payload: Any = None,
) -> Event:
    return Event(
        id=event_id,
        tenant=tenant,
        flow=flow,
        source="test",
        type="test",
        payload={"n": event_id} if payload is None else payload,
    )


class RecordingWorker:
    """A fake worker: records every ``run`` call and can fail, raise or block on demand.

    ``fail_first`` makes the first N attempts of every event fail; ``raise_first`` makes them
    raise instead (an in-process worker blowing up); ``gate`` (when given) holds every run
    until it is set. ``running``/``max_running`` count concurrent runs.
    """

    def __init__(
        self,
        fail_first: int = 0,
        raise_first: int = 0,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.fail_first = fail_first
        self.raise_first = raise_first
        self.gate = gate
        self.calls: list[tuple[str, int]] = []
        self.series: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.running = 0
        self.max_running = 0
        self.running_by_tenant: Counter[str] = Counter()
        self.max_by_tenant: Counter[str] = Counter()

    async def run(self, event: dict[str, Any], attempt: int, series: int = 0) -> RunOutcome:
        self.calls.append((event["id"], attempt))
        self.series.append(series)
        self.events.append(event)
        tenant = event["tenant"]
        self.running += 1
        self.running_by_tenant[tenant] += 1
        self.max_running = max(self.max_running, self.running)
        self.max_by_tenant[tenant] = max(self.max_by_tenant[tenant], self.running_by_tenant[tenant])
        try:
            if self.gate is not None:
                await self.gate.wait()
            if attempt <= self.raise_first:
                raise RuntimeError(f"worker blew up on attempt {attempt}")
            if attempt <= self.fail_first:
                return RunOutcome(ok=False, error=f"failed attempt {attempt}")
            return RunOutcome(ok=True, started_at=time.time(), finished_at=time.time())
        finally:
            self.running -= 1
            self.running_by_tenant[tenant] -= 1

    def ids(self) -> list[str]:
        return [event_id for event_id, _ in self.calls]


class FlakyCoordinator:
    """A coordinator handle that raises :class:`Unavailable` for its first ``failures`` submits.

    With ``lose_replies`` the real coordinator processes the batch first and only the reply is
    lost (the caller must resend and get duplicates back).
    """

    def __init__(self, inner: Coordinator, failures: int, lose_replies: bool = False) -> None:
        self.inner = inner
        self.failures = failures
        self.lose_replies = lose_replies
        self.calls = 0

    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        self.calls += 1
        failing = self.calls <= self.failures
        if failing and not self.lose_replies:
            raise Unavailable("coordinator restarting")
        outcomes = await self.inner.submit(events, rejections)
        if failing:
            raise Unavailable("reply lost")
        return outcomes


class GatedCoordinator:
    """A coordinator handle whose submits wait for ``gate`` before reaching the coordinator."""

    def __init__(self, inner: Coordinator) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.waiting = 0

    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return await self.inner.submit(events, rejections)


class Named:
    """An in-process :class:`PingHandle` over any object with an async ``ping()``."""

    def __init__(self, name: str, target: Any) -> None:
        self.name = name
        self.target = target
        self.restarts = 0

    async def ping(self, timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(self.target.ping(), timeout)

    async def restart(self) -> None:
        self.restarts += 1

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.target, attr)


def no_jitter() -> float:
    """An rng for :class:`Coordinator` that makes backoff exactly the base delay."""
    return 0.5


def make_coordinator(
    db: Path,
    workers: list[WorkerHandle],
    *,
    flows: list[FlowPolicy] | None = None,
    tenants: list[TenantPolicy] | None = None,
    retries: int = 3,
    retry_delay: float = 0.01,
    worker_concurrency: int = 16,
    queue_window: int | None = None,
) -> Coordinator:
    """A coordinator over a SQLite ledger at ``db`` with flow ``acme/ingest`` by default."""
    return Coordinator(
        SQLiteLedger(db),
        workers,
        flows or [FlowPolicy("acme", "ingest", retries=retries, retry_delay=retry_delay)],
        tenants or [TenantPolicy("acme")],
        worker_concurrency=worker_concurrency,
        rng=no_jitter,
        **({} if queue_window is None else {"queue_window": queue_window}),
    )


@contextlib.asynccontextmanager
async def running(coordinator: Coordinator) -> AsyncIterator[Coordinator]:
    """Start a coordinator; on exit stop it (cancelling stragglers) and close its ledger."""
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.stop(drain_timeout=2.0)
        await coordinator.ledger.close()


async def run_states(coordinator: Coordinator) -> dict[str, str]:
    """Event id → run state, read from the ledger."""
    return {r["event_id"]: r["state"] for r in await coordinator.runs()}


async def flow_counts(
    coordinator: Coordinator, tenant: str = "acme", flow: str = "ingest"
) -> dict[str, Any]:
    status = await coordinator.status()
    for f in status["flows"]:
        if (f["tenant"], f["flow"]) == (tenant, flow):
            return f
    raise KeyError(f"{tenant}/{flow}")


def all_in_state(coordinator: Coordinator, n: int, state: str) -> Condition:
    """A condition: exactly ``n`` runs in ``state`` (and none in any other)."""

    async def cond() -> bool:
        states = list((await run_states(coordinator)).values())
        return len(states) == n and all(s == state for s in states)

    return cond


def peak_overlap(outcomes: list[Any]) -> int:
    """Most runs in flight at once, from their started/finished times."""
    edges = sorted(
        [(o.started_at, 1) for o in outcomes] + [(o.finished_at, -1) for o in outcomes],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak
