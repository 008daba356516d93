"""The SQLite ledger's schema, and the migration of files written by earlier versions.

A claim writes each new run into the ``runs`` table and two indexes, so their shape is the
cost of the claim path:

- ``runs`` is a rowid table: rows are appended in claim order, whatever the event ids look
  like, and ``runs_key`` (a small unique index) holds the idempotency key. Before version 2 it
  was ``WITHOUT ROWID`` keyed by ``(tenant, flow, event_id)``, so every claim inserted its
  ~200-byte rows at random places of one big B-tree.
- ``runs_open`` indexes only ``running`` and ``failed`` runs (what a restarted coordinator
  resumes); ``runs_pending`` already covers ``pending`` ones, per flow in claim (rowid)
  order. Before version 2 ``runs_open`` covered ``pending`` too: a third B-tree written by
  every claim, which cost about as much as the two others together.

``PRAGMA user_version`` records the version; :func:`ensure_schema` brings any earlier file up
to date in one transaction when it is opened (a crash in the middle leaves the old schema).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

RUNS_TABLE = """
CREATE TABLE {name} (
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
    batch TEXT
)"""
RUNS_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS runs_key ON runs(tenant, flow, event_id)",
    "CREATE INDEX IF NOT EXISTS runs_open ON runs(state) WHERE state IN ('running', 'failed')",
    "CREATE INDEX IF NOT EXISTS runs_pending ON runs(tenant, flow) WHERE state = 'pending'",
)
OTHER_TABLES = (
    """CREATE TABLE IF NOT EXISTS counters (
    tenant TEXT NOT NULL, flow TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (tenant, flow, name)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS flows (
    tenant TEXT NOT NULL, flow TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0,
    last_event_at REAL,
    PRIMARY KEY (tenant, flow)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, flow TEXT NOT NULL, source TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, ref TEXT NOT NULL, at REAL NOT NULL
)""",
)
COPY_COLUMNS = (
    "tenant, flow, event_id, event, state, attempts, series, worker, next_at, error, "
    "traceback, prefect_flow_run_id, created, updated, batch"
)


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the tables of a new file, or migrate an older one (idempotent; statements run
    one by one, as ``executescript`` would commit the open transaction)."""
    if _version(db) == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _version(db)  # another connection may have migrated in the meantime
        if version < SCHEMA_VERSION:
            _migrate(db)
        elif version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"ledger schema version {version} is newer than this code ({SCHEMA_VERSION})"
            )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(db: sqlite3.Connection) -> None:
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'")
    old = row.fetchone()
    if old is None:
        db.execute(RUNS_TABLE.format(name="runs"))
    else:
        columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
        if "batch" not in columns:  # a ledger written before batch delivery existed
            db.execute("ALTER TABLE runs ADD COLUMN batch TEXT")
        # The old indexes go: runs_open changed, and a rebuilt table drops its own.
        db.execute("DROP INDEX IF EXISTS runs_open")
        db.execute("DROP INDEX IF EXISTS runs_pending")
        if "WITHOUT ROWID" in " ".join(old[0].upper().split()):
            _rebuild_with_rowid(db)
    for statement in (*RUNS_INDEXES, *OTHER_TABLES):
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _rebuild_with_rowid(db: sqlite3.Connection) -> None:
    """Copy a ``WITHOUT ROWID`` runs table into a rowid one, in claim order."""
    db.execute(RUNS_TABLE.format(name="runs_v2"))
    db.execute(
        f"INSERT INTO runs_v2 ({COPY_COLUMNS}) SELECT {COPY_COLUMNS} FROM runs "
        "ORDER BY created, tenant, flow, event_id"
    )
    db.execute("DROP TABLE runs")
    db.execute("ALTER TABLE runs_v2 RENAME TO runs")
