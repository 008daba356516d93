"""The ledger: the durable truth of which events were claimed and what their runs did.

Keys are ``(tenant, flow, event_id)``. A run moves through

    pending ──start──► running ──ok──► completed
       ▲                  │
       │                  └──fail──► failed ──(retry timer)──start──► running ...
       │                                 └──(attempts exhausted)──► dead
       └────────────── replay (dead → pending, new attempt series) ◄────┘

``start`` is the only way into ``running`` and is conditional on the current state, so two
attempts of one event can never run at once; ``finish`` is conditional on the attempt number,
so a stale report from an earlier attempt can never overwrite a later one.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.claims import FlowBatch
from actors.event import Event


class RunState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"


OPEN_STATES = (RunState.PENDING, RunState.RUNNING, RunState.FAILED)
EVENT_COUNTERS = ("seen", "accepted", "duplicate", "rejected")


@dataclass(slots=True)
class RunRecord:
    event: Event
    state: RunState
    attempts: int = 0
    series: int = 0
    worker: int | None = None
    next_at: float | None = None
    error: str | None = None
    traceback: str | None = None
    prefect_flow_run_id: str | None = None
    created: float = 0.0
    updated: float = 0.0
    batch: str | None = None  # the batch id while it runs as a member of a batch

    @property
    def key(self) -> tuple[str, str, str]:
        return self.event.key

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.event.tenant,
            "flow": self.event.flow,
            "event_id": self.event.id,
            "state": self.state.value,
            "attempts": self.attempts,
            "prefect_flow_run_id": self.prefect_flow_run_id,
            "error": self.error,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(slots=True)
class Finish:
    """The outcome of one attempt, reported by the coordinator."""

    key: tuple[str, str, str]
    attempt: int
    ok: bool
    error: str | None = None
    traceback: str | None = None
    prefect_flow_run_id: str | None = None
    retry_at: float | None = None  # when failed and another attempt is allowed; None → dead


@dataclass(slots=True)
class RejectionRecord:
    tenant: str
    flow: str
    source: str
    reason: str
    detail: str
    ref: str = ""
    at: float = 0.0


@dataclass(slots=True)
class FlowCounts:
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_COUNTERS, 0))
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in RunState})
    last_event_at: float | None = None


class Ledger(Protocol):
    """Backends: SQLite (default), Redis and PostgreSQL for multi-node clusters."""

    async def claim(
        self, events: list[Event], packed: Sequence[bytes | bytearray] | None = None
    ) -> list[bool]:
        """Insert-if-absent each event as ``pending``; True where it was new. Counts seen,
        accepted and duplicate in the same transaction. Safe to call again with the same batch.
        ``packed[i]``, when given, is ``events[i]`` as msgpack'd on the wire (``to_wire``),
        which a backend may store instead of encoding the event again."""

    async def claim_batches(self, batches: list[FlowBatch]) -> list[list[bool]]:
        """``claim`` for runs of one flow each, as a host's batch arrives (ids and msgpack'd
        events, not decoded): per batch, True where the event was new. One transaction."""

    async def reject(self, records: list[RejectionRecord]) -> None: ...

    async def start(
        self, key: tuple[str, str, str], worker: int, batch: str | None = None
    ) -> tuple[int, int] | None:
        """``pending``/``failed`` → ``running`` with attempts+1; ``(attempt, series)``, or None
        if the run is not startable (already running, completed or dead). ``series`` counts
        replays, so ``(series, attempt)`` names one attempt for all time."""

    async def start_many(
        self, items: list[tuple[tuple[str, str, str], int]]
    ) -> list[tuple[int, int] | None]:
        """``start`` for several ``(key, worker)`` runs, in one transaction."""
        ...

    async def start_batch(
        self, keys: list[tuple[str, str, str]], worker: int, batch: str
    ) -> list[tuple[int, int] | None]:
        """``start`` every member of a batch in one transaction, recording the batch id."""

    async def finish(self, results: list[Finish]) -> list[bool]:
        """Record outcomes of running attempts; False where the attempt was stale."""

    async def open_runs(self, include_pending: bool = True) -> list[RunRecord]: ...

    async def pending(self, tenant: str, flow: str, limit: int) -> list[Event]:
        """The oldest ``limit`` pending events of one flow (the coordinator pages its
        in-memory queue from here when a backlog outgrew it)."""
        ...

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]: ...

    async def counts(self) -> dict[tuple[str, str], FlowCounts]: ...

    async def set_paused(self, tenant: str, flow: str, paused: bool) -> None: ...

    async def paused(self) -> set[tuple[str, str]]: ...

    async def replay(self, keys: list[tuple[str, str, str]] | None) -> list[Event]:
        """``dead`` → ``pending`` with a new attempt series (all dead runs when keys is None)."""

    async def close(self) -> None: ...


class GroupedStarts:
    """``start``, ``start_many`` and ``start_batch`` for a backend whose ``_start`` starts a
    list of ``(key, worker)`` runs in one transaction (a key repeated starts once)."""

    async def _start(
        self, items: list[tuple[tuple[str, str, str], int]], batch: str | None
    ) -> list[tuple[int, int] | None]:
        raise NotImplementedError

    async def start(
        self, key: tuple[str, str, str], worker: int, batch: str | None = None
    ) -> tuple[int, int] | None:
        return (await self._start([(key, worker)], batch))[0]

    async def start_many(
        self, items: list[tuple[tuple[str, str, str], int]]
    ) -> list[tuple[int, int] | None]:
        """``start`` for several runs (each with its own worker), in one transaction."""
        return await self._start(items, None)

    async def start_batch(
        self, keys: list[tuple[str, str, str]], worker: int, batch: str
    ) -> list[tuple[int, int] | None]:
        """``start`` for every member of a batch, in one transaction."""
        return await self._start([(key, worker) for key in keys], batch)


class ClaimsOfEvents:
    """``claim_batches`` for a backend that claims decoded events (``claim``)."""

    async def claim(
        self, events: list[Event], packed: Sequence[bytes | bytearray] | None = None
    ) -> list[bool]:
        raise NotImplementedError

    async def claim_batches(self, batches: list[FlowBatch]) -> list[list[bool]]:
        events = [e for b in batches for e in b.events()]
        flat = await self.claim(events, [blob for b in batches for blob in b.blobs()])
        out: list[list[bool]] = []
        start = 0
        for b in batches:
            out.append(flat[start : start + len(b)])
            start += len(b)
        return out
