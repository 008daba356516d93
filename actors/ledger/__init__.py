"""Ledger backends behind one interface; ``open_ledger`` picks one from the config URL."""

from __future__ import annotations

from pathlib import Path

from actors.errors import LedgerError
from actors.ledger.base import (
    Finish,
    FlowCounts,
    Ledger,
    RejectionRecord,
    RunRecord,
    RunState,
)
from actors.ledger.sqlite import SQLiteLedger

__all__ = [
    "Finish",
    "FlowCounts",
    "Ledger",
    "RejectionRecord",
    "RunRecord",
    "RunState",
    "SQLiteLedger",
    "ledger_path",
    "open_ledger",
]


def ledger_path(url: str, state_dir: Path) -> Path:
    """The SQLite file for ``sqlite`` or ``sqlite:///path`` (relative to the state dir)."""
    if url == "sqlite":
        return Path(state_dir) / "ledger.db"
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return path if path.is_absolute() else Path(state_dir) / path
    raise LedgerError(f"not a sqlite ledger URL: {url!r}")


def open_ledger(url: str, state_dir: Path, synchronous: str = "normal") -> Ledger:
    if url == "sqlite" or url.startswith("sqlite:///"):
        return SQLiteLedger(ledger_path(url, state_dir), synchronous=synchronous)
    scheme = url.split(":", 1)[0]
    raise LedgerError(
        f"ledger backend {scheme!r} is not available in this build; use 'sqlite' "
        "(Redis and PostgreSQL ledgers are planned for multi-node clusters)"
    )
