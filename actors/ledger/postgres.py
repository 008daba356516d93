"""PostgreSQL ledger: the SQLite ledger's tables and transitions on a shared server.

Same semantics as :class:`~actors.ledger.sqlite.SQLiteLedger`, method for method; the tables
live in one schema per cluster (and per coordinator shard), see
:mod:`actors.ledger.target`. Events are stored as the same msgpack blob (``bytea``).

Durability: every write is one transaction and a call returns only after its COMMIT, with
``synchronous_commit`` at the server's setting (``on`` by default: flushed to the WAL on disk;
a server configured ``off`` is raised to ``on`` for the ledger's session).

One connection, opened on first use inside the caller's event loop (the coordinator is the single
writer of its shard); an ``asyncio.Lock`` runs one call at a time on it, as SQLite does. A lost
connection fails the call in flight with a :class:`LedgerError` and is opened again by the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgpack

from actors.errors import LedgerError
from actors.event import Event
from actors.ledger import postgres_sql as sql
from actors.ledger.base import (
    EVENT_COUNTERS,
    ClaimsOfEvents,
    Finish,
    FlowCounts,
    GroupedStarts,
    RejectionRecord,
    RunRecord,
    RunState,
)
from actors.ledger.postgres_target import connect, parse
from actors.ledger.target import Target

T = TypeVar("T")
Key = tuple[str, str, str]
MAX_REJECTIONS_KEPT = 10_000
_CONNECTION_ERRORS = (  # the connection is gone (or the server going): open a new one
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. the server's FATAL arrived while a query was sent
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


def _pack(event: Event) -> bytes:
    return msgpack.packb(event.to_wire(), use_bin_type=True)


def _event(blob: bytes) -> Event:
    return Event.from_wire(msgpack.unpackb(blob, raw=False))


def _record(row: asyncpg.Record) -> RunRecord:
    return RunRecord(
        event=_event(row["event"]),
        state=RunState(row["state"]),
        attempts=row["attempts"],
        series=row["series"],
        worker=row["worker"],
        next_at=row["next_at"],
        error=row["error"],
        traceback=row["traceback"],
        prefect_flow_run_id=row["prefect_flow_run_id"],
        created=row["created"],
        updated=row["updated"],
        batch=row["batch"],
    )


def _columns(keys: list[Key]) -> tuple[list[str], list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]


class PostgresLedger(ClaimsOfEvents, GroupedStarts):
    def __init__(self, url: str, state_dir: Path | str) -> None:
        self.target: Target = parse(url, state_dir)
        self.schema = self.target.name
        self._sql = sql.statements(self.schema)
        self._conn: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the connection
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresLedger({self.target.safe_url!r}, schema={self.schema!r})"

    # -- connection ---------------------------------------------------------------------
    async def _connection(self) -> asyncpg.Connection:
        if self._closed:
            raise LedgerError(f"the ledger at {self.target.safe_url} is closed")
        if self._conn is None or self._conn.is_closed():
            conn = await connect(self.target)
            try:
                if await conn.fetchval("SHOW synchronous_commit") == "off":
                    await conn.execute("SET synchronous_commit = on")
                async with conn.transaction():
                    # Concurrent CREATE ... IF NOT EXISTS can still collide: serialise them.
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.schema)
                    await conn.execute(sql.schema_ddl(self.schema))
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                conn.terminate()
                raise LedgerError(
                    f"cannot prepare the postgresql ledger at {self.target.safe_url} "
                    f"(schema {self.schema}): {type(exc).__name__}: {exc}"
                ) from exc
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``op`` alone on the connection; a lost connection becomes a LedgerError."""
        self._follow_loop()
        async with self._lock:
            conn = await self._connection()
            try:
                return await op(conn)
            except _CONNECTION_ERRORS as exc:
                self._conn = None
                conn.terminate()
                raise LedgerError(
                    f"lost the connection to the postgresql ledger at {self.target.safe_url} "
                    f"({type(exc).__name__}: {exc}); the call may or may not have committed"
                ) from exc
            except asyncpg.PostgresError as exc:  # rolled back; the connection stays usable
                raise LedgerError(
                    f"the postgresql ledger at {self.target.safe_url} (schema {self.schema}) "
                    f"refused a call: {type(exc).__name__}: {exc}"
                ) from exc

    def _follow_loop(self) -> None:
        """A connection belongs to one event loop: called from another (a script calling
        ``asyncio.run`` twice), leave the old connection and open a new one there."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
            self._conn = None
        self._loop, self._lock = loop, asyncio.Lock()

    async def close(self) -> None:
        self._follow_loop()
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed():
                await conn.close()

    # -- claims -------------------------------------------------------------------------
    async def claim(
        self, events: list[Event], packed: Sequence[bytes | bytearray] | None = None
    ) -> list[bool]:
        """Insert-if-absent, one transaction per batch: which events are new.

        The first occurrence of each key in the batch is offered to one
        ``INSERT ... ON CONFLICT DO NOTHING RETURNING``; the keys it returns are new, every
        other position (known keys, repeats inside the batch) is a duplicate."""
        if not events:
            return []
        first: dict[Key, int] = {}
        for i, e in enumerate(events):
            first.setdefault(e.key, i)
        # In key order: writers racing on overlapping batches take row locks in one order.
        order = [first[key] for key in sorted(first)]
        offered = [events[i] for i in order]
        blobs = [bytes(packed[i]) if packed else _pack(events[i]) for i in order]
        now = time.time()

        committing: list[list[bool]] = []  # the answer, once COMMIT has been sent

        async def op(conn: asyncpg.Connection) -> list[bool]:
            async with conn.transaction():
                rows = await conn.fetch(
                    self._sql.claim,
                    [e.tenant for e in offered],
                    [e.flow for e in offered],
                    [e.id for e in offered],
                    blobs,
                    now,
                )
                inserted = {(r["tenant"], r["flow"], r["event_id"]) for r in rows}
                new = [first[e.key] == i and e.key in inserted for i, e in enumerate(events)]
                bumps: dict[tuple[str, str, str], int] = {}
                for e, is_new in zip(events, new, strict=True):
                    for name in ("seen", "accepted" if is_new else "duplicate"):
                        key = (e.tenant, e.flow, name)
                        bumps[key] = bumps.get(key, 0) + 1
                await self._bump(conn, bumps)
                flows = sorted({(e.tenant, e.flow) for e in events})
                await conn.execute(
                    self._sql.touch_flows, [f[0] for f in flows], [f[1] for f in flows], now
                )
                committing.append(new)
            return new

        try:
            return await self._run(op)
        except LedgerError:
            if not committing:
                raise  # lost before COMMIT: the server rolled the batch back
            return await self._resolve_claim(committing[0], events, now)

    async def _resolve_claim(self, new: list[bool], events: list[Event], now: float) -> list[bool]:
        """The connection was lost after COMMIT was sent: did it commit? (A resend would call
        committed events duplicates, and they would never run.) The rows this claim inserted
        carry ``created = now``: there → committed, the answer stands; absent → nothing was."""
        keys = [e.key for e, is_new in zip(events, new, strict=True) if is_new]
        if not keys:
            return new  # all duplicates either way; only this batch's counters may be lost
        found = await self._run(
            lambda conn: conn.fetchval(self._sql.claimed_at, *_columns(keys), now)
        )
        if found:
            return new
        raise LedgerError(
            f"the postgresql ledger at {self.target.safe_url} did not commit a claim of "
            f"{len(events)} events (the connection was lost); send them again"
        )

    async def _bump(self, conn: asyncpg.Connection, bumps: dict[tuple[str, str, str], int]) -> None:
        if bumps:
            keys = sorted(bumps)  # one lock order for every writer
            await conn.execute(self._sql.bump, *_columns(keys), [bumps[k] for k in keys])

    async def reject(self, records: list[RejectionRecord]) -> None:
        if not records:
            return
        now = time.time()
        bumps: dict[tuple[str, str, str], int] = {}
        for r in records:
            for name in ("rejected", f"rejected:{r.reason}"):
                bumps[(r.tenant, r.flow, name)] = bumps.get((r.tenant, r.flow, name), 0) + 1

        async def op(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await self._bump(conn, bumps)
                await conn.executemany(
                    self._sql.insert_rejection,
                    [
                        (r.tenant, r.flow, r.source, r.reason, r.detail[:2000], r.ref, r.at or now)
                        for r in records
                    ],
                )
                await conn.execute(self._sql.trim_rejections, MAX_REJECTIONS_KEPT)

        await self._run(op)

    # -- run transitions ----------------------------------------------------------------
    async def _start(
        self, items: list[tuple[Key, int]], batch: str | None
    ) -> list[tuple[int, int] | None]:
        """One ``UPDATE ... FROM unnest(...)``; a key repeated in ``items`` starts once (its
        first occurrence, with that worker), as a second ``start`` of a running run would."""
        if not items:
            return []
        first: dict[Key, int] = {}
        for i, (key, _) in enumerate(items):
            first.setdefault(key, i)
        keys = list(first)
        workers = [items[i][1] for i in first.values()]

        async def op(conn: asyncpg.Connection) -> dict[Key, tuple[int, int]]:
            rows = await conn.fetch(self._sql.start, *_columns(keys), workers, batch, time.time())
            return {(r[0], r[1], r[2]): (int(r[3]), int(r[4])) for r in rows}

        started = await self._run(op)
        return [started.get(key) if first[key] == i else None for i, (key, _) in enumerate(items)]

    async def finish(self, results: list[Finish]) -> list[bool]:
        """One ``UPDATE ... FROM unnest(...)``: an outcome applies only to the running attempt
        it names; a repeat of the same ``(key, attempt)`` in one call is stale."""
        if not results:
            return []
        first: dict[tuple[Key, int], int] = {}
        for i, r in enumerate(results):
            first.setdefault((r.key, r.attempt), i)
        chosen = [results[i] for i in first.values()]
        states = [
            (
                RunState.COMPLETED
                if r.ok
                else (RunState.FAILED if r.retry_at is not None else RunState.DEAD)
            ).value
            for r in chosen
        ]

        async def op(conn: asyncpg.Connection) -> set[tuple[Key, int]]:
            rows = await conn.fetch(
                self._sql.finish,
                *_columns([r.key for r in chosen]),
                [r.attempt for r in chosen],
                states,
                [r.error for r in chosen],
                [r.traceback for r in chosen],
                [r.retry_at for r in chosen],
                [r.prefect_flow_run_id for r in chosen],
                time.time(),
            )
            return {((r[0], r[1], r[2]), int(r[3])) for r in rows}

        done = await self._run(op)
        return [
            first[(r.key, r.attempt)] == i and (r.key, r.attempt) in done
            for i, r in enumerate(results)
        ]

    async def replay(self, keys: list[Key] | None) -> list[Event]:
        async def op(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            if keys is None:
                return await conn.fetch(self._sql.replay_all, time.time())
            unique = list(dict.fromkeys(keys))
            return await conn.fetch(self._sql.replay_keys, *_columns(unique), time.time())

        rows = [] if keys == [] else await self._run(op)
        if keys is not None:  # in the order asked for, as one UPDATE per key would return
            order: dict[Key, int] = {}
            for i, key in enumerate(keys):
                order.setdefault(key, i)
            rows.sort(key=lambda r: order[(r["tenant"], r["flow"], r["event_id"])])
        return [_event(r["event"]) for r in rows]

    # -- reads --------------------------------------------------------------------------
    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(query, *args))

    async def open_runs(self, include_pending: bool = True) -> list[RunRecord]:
        states = ["pending", "running", "failed"] if include_pending else ["running", "failed"]
        return [_record(r) for r in await self._fetch(self._sql.open_runs, states)]

    async def pending(self, tenant: str, flow: str, limit: int) -> list[Event]:
        """The oldest ``limit`` events of a flow still waiting for their first start."""
        rows = await self._fetch(self._sql.pending, tenant, flow, limit)
        return [_event(r["event"]) for r in rows]

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        return [_record(r) for r in await self._fetch(self._sql.runs, tenant, flow, state, limit)]

    async def counts(self) -> dict[tuple[str, str], FlowCounts]:
        async def op(conn: asyncpg.Connection) -> list[list[asyncpg.Record]]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return [
                    await conn.fetch(self._sql.counters),
                    await conn.fetch(self._sql.run_counts),
                    await conn.fetch(self._sql.last_events),
                ]

        counters, run_counts, last_events = await self._run(op)
        out: dict[tuple[str, str], FlowCounts] = {}
        for tenant, flow, name, value in counters:
            c = out.setdefault((tenant, flow), FlowCounts())
            if name in EVENT_COUNTERS:
                c.events[name] = value
            elif name.startswith("rejected:"):
                c.rejected_by_reason[name.split(":", 1)[1]] = value
        for tenant, flow, state, n in run_counts:
            out.setdefault((tenant, flow), FlowCounts()).runs[state] = n
        for tenant, flow, last in last_events:
            out.setdefault((tenant, flow), FlowCounts()).last_event_at = last
        return out

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        rows = await self._fetch(self._sql.rejections, limit)
        return [RejectionRecord(*r) for r in rows]

    # -- flow state ---------------------------------------------------------------------
    async def set_paused(self, tenant: str, flow: str, paused: bool) -> None:
        await self._run(lambda conn: conn.execute(self._sql.set_paused, tenant, flow, paused))

    async def paused(self) -> set[tuple[str, str]]:
        return {(r[0], r[1]) for r in await self._fetch(self._sql.paused)}
