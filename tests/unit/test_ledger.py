"""SQLite-only ledger behaviour: files, WAL, URL resolution, ``open_ledger``'s choices.

Everything every backend must do (claims, counters, transitions, dead letters, reopening) is
the contract in ``tests/contract/test_ledger_contract.py``, run against SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers import make_event

from actors.errors import LedgerError
from actors.ledger import SQLiteLedger, ledger_path, open_ledger


async def test_the_ledger_file_is_created_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.db"
    led = SQLiteLedger(path)
    try:
        await led.claim([make_event("e1")])
    finally:
        await led.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT event_id, state FROM runs").fetchall() == [("e1", "pending")]


# -- open_ledger ---------------------------------------------------------------------------
def test_sqlite_urls_resolve_under_the_state_dir(tmp_path: Path) -> None:
    assert ledger_path("sqlite", tmp_path) == tmp_path / "ledger.db"
    assert ledger_path("sqlite:///sub/l.db", tmp_path) == tmp_path / "sub" / "l.db"
    assert ledger_path(f"sqlite:///{tmp_path}/abs.db", Path("/elsewhere")) == tmp_path / "abs.db"


async def test_open_ledger_builds_a_sqlite_ledger(tmp_path: Path) -> None:
    led = open_ledger("sqlite", tmp_path)
    try:
        assert isinstance(led, SQLiteLedger)
        assert (tmp_path / "ledger.db").exists()
    finally:
        await led.close()


@pytest.mark.parametrize("url", ["mysql://x/y", "mongodb://h/db"])
def test_unavailable_backends_fail_with_a_clear_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(LedgerError, match="not available"):
        open_ledger(url, tmp_path)
