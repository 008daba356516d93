"""SQLite ledger (WAL). The default backend for single-node clusters.

WAL with ``synchronous=NORMAL`` survives kill -9 of any process (only an OS crash can lose
the last commits); ``synchronous=FULL`` adds power-loss durability. Calls are short, batched
transactions run inline on the caller's event loop: a 1,000-row claim takes a few ms.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack

from actors.claims import FlowBatch, batches_of, in_input_order
from actors.event import Event
from actors.ledger.base import (
    EVENT_COUNTERS,
    Finish,
    FlowCounts,
    RejectionRecord,
    RunRecord,
    RunState,
)
from actors.ledger.sqlite_schema import ensure_schema

RUN_COLUMNS = (
    "event, state, attempts, series, worker, next_at, error, traceback, "
    "prefect_flow_run_id, created, updated, batch"
)
MAX_REJECTIONS_KEPT = 10_000
CLAIM_ROWS = 512  # most rows per claim INSERT (2 variables each)
BUMP = (
    "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (tenant, flow, name) "
    "DO UPDATE SET value = value + excluded.value"
)


@functools.cache
def _insert_sql(rows: int) -> str:
    """``rows`` runs of one flow: ?1 tenant, ?2 flow, ?3 now, then (event id, blob) pairs."""
    values = ",".join(
        f"(?1, ?2, ?{4 + 2 * j}, ?{5 + 2 * j}, 'pending', ?3, ?3)" for j in range(rows)
    )
    return (
        "INSERT INTO runs (tenant, flow, event_id, event, state, created, updated) "
        f"VALUES {values} ON CONFLICT (tenant, flow, event_id) DO NOTHING RETURNING event_id"
    )


def _record(row: tuple) -> RunRecord:
    return RunRecord(
        event=Event.from_wire(msgpack.unpackb(row[0], raw=False)),
        state=RunState(row[1]),
        attempts=row[2],
        series=row[3],
        worker=row[4],
        next_at=row[5],
        error=row[6],
        traceback=row[7],
        prefect_flow_run_id=row[8],
        created=row[9],
        updated=row[10],
        batch=row[11],
    )


class SQLiteLedger:
    def __init__(self, path: Path | str, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=30000")
        ensure_schema(self._db)
        # Claim statements bind 2 variables a row (+3); older SQLite builds allow only 999.
        limit = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._max_rows = max(1, min(CLAIM_ROWS, 1 << (((limit - 3) // 2).bit_length() - 1)))

    # -- claims -------------------------------------------------------------------------
    async def claim(
        self, events: list[Event], packed: Sequence[bytes | bytearray] | None = None
    ) -> list[bool]:
        """Insert-if-absent, one transaction per batch: which events are new (see
        :meth:`claim_batches`). ``packed[i]``, when given, is ``events[i]`` already
        msgpack'd (as the coordinator received it), stored as is."""
        if not events:
            return []
        batches, order = batches_of(events, packed)
        news = await self.claim_batches(batches)
        return in_input_order([x for new in news for x in new], order)

    async def claim_batches(self, batches: list[FlowBatch]) -> list[list[bool]]:
        """Insert-if-absent, one transaction for all batches: per batch, which events are new.

        Per run of one flow, ``INSERT ... ON CONFLICT DO NOTHING RETURNING event_id`` names
        the rows it inserted: one probe of the key per event, no separate lookup. A repeat
        inside the transaction (in the same run or a later one) is a duplicate."""
        if not batches:
            return []
        now = time.time()
        out: list[list[bool]] = []
        counts: dict[tuple[str, str], list[int]] = {}  # flow → [seen, accepted]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for b in batches:
                new = self._claim_run(b, now)
                out.append(new)
                c = counts.get(b.key)
                if c is None:
                    c = counts[b.key] = [0, 0]
                c[0] += len(new)
                c[1] += new.count(True)
            bumps = [
                (*key, name, n)
                for key, (seen, accepted) in counts.items()
                for name, n in (
                    ("seen", seen),
                    ("accepted", accepted),
                    ("duplicate", seen - accepted),
                )
                if n
            ]
            db.executemany(BUMP, bumps)
            db.executemany(
                "INSERT INTO flows (tenant, flow, last_event_at) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, flow) DO UPDATE SET "
                "last_event_at = excluded.last_event_at",
                [(*key, now) for key in counts],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _claim_run(self, b: FlowBatch, now: float) -> list[bool]:
        ids, n = b.ids, len(b.ids)
        if not n:
            return []
        blobs = b.blobs()
        if len(set(ids)) == n:  # the usual case: no repeats inside the run
            inserted = self._insert_new(b.key, ids, blobs, now)
            if len(inserted) == n:
                return [True] * n
            if not inserted:
                return [False] * n
            fresh = set(inserted)
            return [i in fresh for i in ids]
        first: dict[str, int] = {}
        for i, event_id in enumerate(ids):
            first.setdefault(event_id, i)
        new = [False] * n
        offered = list(first.values())
        for event_id in self._insert_new(b.key, list(first), [blobs[i] for i in offered], now):
            new[first[event_id]] = True
        return new

    def _insert_new(
        self, key: tuple[str, str], ids: list[str], blobs: list[bytearray], now: float
    ) -> list[str]:
        """Insert the runs of one flow that are not there yet; the ids inserted. Multi-row
        statements of power-of-two sizes (so few shapes get compiled and cached)."""
        inserted: list[str] = []
        start = 0
        while start < len(ids):
            size = min(self._max_rows, 1 << ((len(ids) - start).bit_length() - 1))
            params: list[object] = [key[0], key[1], now, *([None] * (2 * size))]
            params[3::2] = ids[start : start + size]
            params[4::2] = blobs[start : start + size]
            inserted += [row[0] for row in self._db.execute(_insert_sql(size), params)]
            start += size
        return inserted

    def _bump(self, tenant: str, flow: str, name: str, by: int) -> None:
        if by:
            self._db.execute(BUMP, (tenant, flow, name, by))

    async def reject(self, records: list[RejectionRecord]) -> None:
        if not records:
            return
        db, now = self._db, time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            for r in records:
                self._bump(r.tenant, r.flow, "rejected", 1)
                self._bump(r.tenant, r.flow, f"rejected:{r.reason}", 1)
                db.execute(
                    "INSERT INTO rejections (tenant, flow, source, reason, detail, ref, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.tenant, r.flow, r.source, r.reason, r.detail[:2000], r.ref, r.at or now),
                )
            db.execute(
                "DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                (MAX_REJECTIONS_KEPT,),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- run transitions ----------------------------------------------------------------
    async def start(
        self, key: tuple[str, str, str], worker: int, batch: str | None = None
    ) -> tuple[int, int] | None:
        return self._start(key, worker, batch, time.time())

    def _start(
        self, key: tuple[str, str, str], worker: int, batch: str | None, now: float
    ) -> tuple[int, int] | None:
        row = self._db.execute(
            "UPDATE runs SET state = 'running', attempts = attempts + 1, worker = ?, "
            "batch = ?, next_at = NULL, updated = ? WHERE tenant = ? AND flow = ? "
            "AND event_id = ? AND state IN ('pending', 'failed') RETURNING attempts, series",
            (worker, batch, now, *key),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    async def start_many(
        self, items: list[tuple[tuple[str, str, str], int]]
    ) -> list[tuple[int, int] | None]:
        """``start`` for several runs (each with its own worker), in one transaction."""
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            started = [self._start(key, worker, None, now) for key, worker in items]
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return started

    async def start_batch(
        self, keys: list[tuple[str, str, str]], worker: int, batch: str
    ) -> list[tuple[int, int] | None]:
        """``start`` for every member of a batch, in one transaction."""
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            started = [self._start(key, worker, batch, now) for key in keys]
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return started

    async def finish(self, results: list[Finish]) -> list[bool]:
        now = time.time()
        done: list[bool] = []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for r in results:
                state = (
                    RunState.COMPLETED
                    if r.ok
                    else (RunState.FAILED if r.retry_at is not None else RunState.DEAD)
                )
                cur = db.execute(
                    "UPDATE runs SET state = ?, error = ?, traceback = ?, next_at = ?, "
                    "prefect_flow_run_id = COALESCE(?, prefect_flow_run_id), updated = ? "
                    "WHERE tenant = ? AND flow = ? AND event_id = ? AND state = 'running' "
                    "AND attempts = ?",
                    (
                        state.value,
                        r.error,
                        r.traceback,
                        r.retry_at,
                        r.prefect_flow_run_id,
                        now,
                        *r.key,
                        r.attempt,
                    ),
                )
                done.append(cur.rowcount == 1)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return done

    async def replay(self, keys: list[tuple[str, str, str]] | None) -> list[Event]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if keys is None:
                rows = db.execute(
                    "UPDATE runs SET state = 'pending', attempts = 0, series = series + 1, "
                    "error = NULL, traceback = NULL, next_at = NULL, updated = ? "
                    "WHERE state = 'dead' RETURNING event",
                    (time.time(),),
                ).fetchall()
            else:
                rows = []
                for key in keys:
                    rows += db.execute(
                        "UPDATE runs SET state = 'pending', attempts = 0, series = series + 1, "
                        "error = NULL, traceback = NULL, next_at = NULL, updated = ? "
                        "WHERE tenant = ? AND flow = ? AND event_id = ? AND state = 'dead' "
                        "RETURNING event",
                        (time.time(), *key),
                    ).fetchall()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [Event.from_wire(msgpack.unpackb(r[0], raw=False)) for r in rows]

    # -- reads --------------------------------------------------------------------------
    async def open_runs(self, include_pending: bool = True) -> list[RunRecord]:
        """Runs not finished. Without pending runs (what a restarting coordinator resumes)
        this reads ``runs_open``; with them it scans the table (pending runs are paged per
        flow through ``pending`` instead)."""
        states = "('pending', 'running', 'failed')" if include_pending else "('running', 'failed')"
        rows = self._db.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE state IN {states} ORDER BY created"
        ).fetchall()
        return [_record(r) for r in rows]

    async def pending(self, tenant: str, flow: str, limit: int) -> list[Event]:
        """The oldest ``limit`` events of a flow still waiting for their first start, in claim
        order (rowid: appended as claimed, so ``runs_pending`` holds them in that order)."""
        rows = self._db.execute(
            "SELECT event FROM runs WHERE tenant = ? AND flow = ? AND state = 'pending' "
            "ORDER BY rowid LIMIT ?",
            (tenant, flow, limit),
        ).fetchall()
        return [Event.from_wire(msgpack.unpackb(r[0], raw=False)) for r in rows]

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        where, args = [], []
        for column, value in (("tenant", tenant), ("flow", flow), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, event_id LIMIT ?"
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [_record(r) for r in rows]

    async def counts(self) -> dict[tuple[str, str], FlowCounts]:
        out: dict[tuple[str, str], FlowCounts] = {}
        for tenant, flow, name, value in self._db.execute("SELECT * FROM counters"):
            c = out.setdefault((tenant, flow), FlowCounts())
            if name in EVENT_COUNTERS:
                c.events[name] = value
            elif name.startswith("rejected:"):
                c.rejected_by_reason[name.split(":", 1)[1]] = value
        for tenant, flow, state, n in self._db.execute(
            "SELECT tenant, flow, state, COUNT(*) FROM runs GROUP BY tenant, flow, state"
        ):
            out.setdefault((tenant, flow), FlowCounts()).runs[state] = n
        for tenant, flow, last in self._db.execute("SELECT tenant, flow, last_event_at FROM flows"):
            out.setdefault((tenant, flow), FlowCounts()).last_event_at = last
        return out

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        rows = self._db.execute(
            "SELECT tenant, flow, source, reason, detail, ref, at FROM rejections "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [RejectionRecord(*r) for r in rows]

    # -- flow state ---------------------------------------------------------------------
    async def set_paused(self, tenant: str, flow: str, paused: bool) -> None:
        self._db.execute(
            "INSERT INTO flows (tenant, flow, paused) VALUES (?, ?, ?) "
            "ON CONFLICT (tenant, flow) DO UPDATE SET paused = excluded.paused",
            (tenant, flow, int(paused)),
        )

    async def paused(self) -> set[tuple[str, str]]:
        return {
            (t, f) for t, f in self._db.execute("SELECT tenant, flow FROM flows WHERE paused = 1")
        }

    async def close(self) -> None:
        self._db.close()
