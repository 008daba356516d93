"""SQLite ledger schema: files written by earlier versions open, migrate once and keep every
run; the queries of the hot paths read their indexes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import pytest
from helpers import make_event

from actors.event import Event
from actors.ledger import Finish, SQLiteLedger
from actors.ledger.sqlite_schema import SCHEMA_VERSION

# The schema as written before version 2 (a frozen copy: the file layout the code must read).
V1_RUNS = """
CREATE TABLE runs (
    tenant TEXT NOT NULL, flow TEXT NOT NULL, event_id TEXT NOT NULL,
    event BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    series INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    next_at REAL,
    error TEXT, traceback TEXT,
    prefect_flow_run_id TEXT,
    created REAL NOT NULL, updated REAL NOT NULL,
    {batch}
    PRIMARY KEY (tenant, flow, event_id)
) WITHOUT ROWID;
CREATE INDEX runs_open ON runs(state) WHERE state IN ('pending','running','failed');
CREATE INDEX runs_pending ON runs(tenant, flow, created) WHERE state = 'pending';
CREATE TABLE counters (
    tenant TEXT NOT NULL, flow TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (tenant, flow, name)
) WITHOUT ROWID;
CREATE TABLE flows (
    tenant TEXT NOT NULL, flow TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0,
    last_event_at REAL,
    PRIMARY KEY (tenant, flow)
) WITHOUT ROWID;
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, flow TEXT NOT NULL, source TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, ref TEXT NOT NULL, at REAL NOT NULL
);
"""

# (event id, state, attempts, worker, next_at, created, batch)
OLD_RUNS = [
    ("p2", "pending", 0, None, None, 5.0, None),
    ("p1", "pending", 0, None, None, 4.0, None),
    ("r1", "running", 1, 1, None, 1.0, "b-1"),
    ("f1", "failed", 2, 0, 99.0, 2.0, None),
    ("c1", "completed", 1, 0, None, 3.0, None),
    ("d1", "dead", 3, 0, None, 0.5, None),
]


def old_event(event_id: str) -> Event:
    return Event(event_id, "acme", "ingest", "s3://b", "created", "2026-01-01", {"k": event_id})


def write_v1_ledger(path: Path, with_batch_column: bool = True) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_RUNS.format(batch="batch TEXT," if with_batch_column else ""))
    for event_id, state, attempts, worker, next_at, created, batch in OLD_RUNS:
        blob = msgpack.packb(old_event(event_id).to_wire(), use_bin_type=True)
        columns = "tenant, flow, event_id, event, state, attempts, worker, next_at, created"
        values = ["acme", "ingest", event_id, blob, state, attempts, worker, next_at, created]
        if with_batch_column:
            columns += ", batch"
            values.append(batch)
        marks = ", ".join("?" * (len(values) + 1))
        db.execute(f"INSERT INTO runs ({columns}, updated) VALUES ({marks})", (*values, created))
    db.executemany(
        "INSERT INTO counters VALUES ('acme', 'ingest', ?, ?)",
        [("seen", 7), ("accepted", 6), ("duplicate", 1)],
    )
    db.execute("INSERT INTO flows VALUES ('acme', 'ingest', 1, 5.0)")
    db.close()


def schema_of(path: Path) -> tuple[int, str, str]:
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        table, runs_open = (
            db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
            for name in ("runs", "runs_open")
        )
        return version, table, runs_open
    finally:
        db.close()


@pytest.mark.parametrize("with_batch_column", [True, False])
async def test_a_v1_ledger_keeps_every_run_and_counter_after_migration(
    tmp_path: Path, with_batch_column: bool
) -> None:
    path = tmp_path / "ledger.db"
    write_v1_ledger(path, with_batch_column)
    ledger = SQLiteLedger(path)
    try:
        records = {r.event.id: r for r in await ledger.runs()}
        assert {
            i: (r.state.value, r.attempts, r.worker, r.next_at) for i, r in records.items()
        } == {
            event_id: (state, attempts, worker, next_at)
            for event_id, state, attempts, worker, next_at, _, _ in OLD_RUNS
        }
        assert records["r1"].batch == ("b-1" if with_batch_column else None)
        assert records["p1"].event == old_event("p1")
        counts = (await ledger.counts())[("acme", "ingest")]
        assert counts.events == {"seen": 7, "accepted": 6, "duplicate": 1, "rejected": 0}
        assert counts.runs == {"pending": 2, "running": 1, "completed": 1, "failed": 1, "dead": 1}
        assert await ledger.paused() == {("acme", "ingest")}
    finally:
        await ledger.close()
    version, table, runs_open = schema_of(path)
    assert version == SCHEMA_VERSION
    assert "WITHOUT ROWID" not in table.upper()
    assert "'pending'" not in runs_open


async def test_a_migrated_ledger_still_claims_each_id_once_and_resumes_its_runs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    write_v1_ledger(path)
    ledger = SQLiteLedger(path)
    try:
        ids = ["p1", "c1", "new1", "d1", "new1", "new2"]
        assert await ledger.claim([make_event(i) for i in ids]) == [
            False,
            False,
            True,
            False,
            False,
            True,
        ]
        assert [e.id for e in await ledger.pending("acme", "ingest", 10)] == [
            "p1",
            "p2",
            "new1",
            "new2",
        ]
        resumed = await ledger.open_runs(include_pending=False)
        assert sorted((r.event.id, r.state.value) for r in resumed) == [
            ("f1", "failed"),
            ("r1", "running"),
        ]
        assert await ledger.start(("acme", "ingest", "f1"), 0) == (3, 0)
        assert await ledger.finish([Finish(("acme", "ingest", "f1"), 3, ok=True)]) == [True]
        assert [e.id for e in await ledger.replay(None)] == ["d1"]
        counts = (await ledger.counts())[("acme", "ingest")]
        assert counts.events == {"seen": 13, "accepted": 8, "duplicate": 5, "rejected": 0}
    finally:
        await ledger.close()


async def test_opening_a_migrated_ledger_again_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write_v1_ledger(path)
    await SQLiteLedger(path).close()
    first = schema_of(path)
    again = SQLiteLedger(path)
    try:
        assert len(await again.runs()) == len(OLD_RUNS)
    finally:
        await again.close()
    assert schema_of(path) == first


async def test_two_connections_opening_a_v1_ledger_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write_v1_ledger(path)
    a, b = SQLiteLedger(path), SQLiteLedger(path)
    try:
        assert await a.claim([make_event("x")]) == [True]
        assert await b.claim([make_event("x"), make_event("p1")]) == [False, False]
        assert len(await b.runs()) == len(OLD_RUNS) + 1
    finally:
        await a.close()
        await b.close()


async def test_a_ledger_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await SQLiteLedger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        SQLiteLedger(path)


async def test_stored_event_blob_is_the_wire_encoding(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    try:
        event = Event("w1", "acme", "ingest", "s", "t", "2026-01-01", {"k": [1, 2]}, 3.5)
        wire = msgpack.packb(event.to_wire(), use_bin_type=True)
        assert await ledger.claim([event], [wire]) == [True]
        assert (await ledger.pending("acme", "ingest", 1)) == [event]
        (stored,) = ledger._db.execute("SELECT event FROM runs").fetchone()
        assert stored == wire
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (
            "SELECT event FROM runs WHERE tenant = 'a' AND flow = 'b' AND state = 'pending' "
            "ORDER BY rowid LIMIT 5",
            "runs_pending",
        ),
        (
            "SELECT event FROM runs WHERE state IN ('running', 'failed') ORDER BY created",
            "runs_open",
        ),
        (
            "UPDATE runs SET state = 'running' WHERE tenant = 'a' AND flow = 'b' "
            "AND event_id = 'c' AND state IN ('pending', 'failed')",
            "runs_key",
        ),
    ],
)
async def test_hot_queries_read_their_index(tmp_path: Path, query: str, index: str) -> None:
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    try:
        await ledger.claim([make_event(f"e{i}") for i in range(50)])
        plan = " ".join(str(row[3]) for row in ledger._db.execute(f"EXPLAIN QUERY PLAN {query}"))
        assert f"USING INDEX {index}" in plan
        assert "ORDER BY rowid" not in query or "TEMP B-TREE" not in plan
    finally:
        await ledger.close()
