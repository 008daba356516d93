"""Ledger backends behind one interface; ``open_ledger`` picks one from the config URL."""

from __future__ import annotations

import re
from pathlib import Path

from actors.errors import LedgerError
from actors.ledger import postgres_target, redis_target, target
from actors.ledger.base import (
    Finish,
    FlowCounts,
    Ledger,
    RejectionRecord,
    RunRecord,
    RunState,
)
from actors.ledger.postgres_target import is_postgres_url
from actors.ledger.redis_target import is_redis_url
from actors.ledger.sqlite import SQLiteLedger

__all__ = [
    "Finish",
    "FlowCounts",
    "Ledger",
    "RejectionRecord",
    "RunRecord",
    "RunState",
    "SQLiteLedger",
    "check_shard_layout",
    "is_postgres_url",
    "is_redis_url",
    "is_sqlite_url",
    "ledger_path",
    "open_ledger",
    "open_written_shards",
    "shard_ledger_url",
    "shard_paths",
]


def ledger_path(url: str, state_dir: Path) -> Path:
    """The SQLite file for ``sqlite`` or ``sqlite:///path`` (relative to the state dir)."""
    if url == "sqlite":
        return Path(state_dir) / "ledger.db"
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return path if path.is_absolute() else Path(state_dir) / path
    raise LedgerError(f"not a sqlite ledger URL: {url!r}")


def is_sqlite_url(url: str) -> bool:
    return url == "sqlite" or url.startswith("sqlite:///")


def open_ledger(url: str, state_dir: Path, synchronous: str = "normal") -> Ledger:
    """The ledger at ``url``. ``synchronous`` tunes SQLite only (PostgreSQL commits with the
    server's ``synchronous_commit``, Redis persists as the server is configured). A networked
    ledger connects on first use, in the caller's event loop."""
    if is_sqlite_url(url):
        return SQLiteLedger(ledger_path(url, state_dir), synchronous=synchronous)
    if is_postgres_url(url):
        try:
            from actors.ledger.postgres import PostgresLedger
        except ImportError as exc:
            raise LedgerError(
                "the postgresql ledger needs asyncpg, which is not installed: "
                f"{postgres_target.INSTALL_HINT}"
            ) from exc
        return PostgresLedger(url, state_dir)
    if is_redis_url(url):
        try:
            from actors.ledger.redis import RedisLedger
        except ImportError as exc:
            raise LedgerError(
                "the redis ledger needs redis-py, which is not installed: "
                f"{redis_target.INSTALL_HINT}"
            ) from exc
        return RedisLedger(url, state_dir)
    scheme = url.split(":", 1)[0]
    raise LedgerError(
        f"ledger backend {scheme!r} is not available: use sqlite, sqlite:///path, "
        "postgresql://... or redis://..."
    )


def _networked(url: str) -> bool:
    return is_postgres_url(url) or is_redis_url(url)


def _target(url: str, state_dir: Path) -> target.Target:
    if is_postgres_url(url):
        return postgres_target.parse(url, state_dir)
    return redis_target.parse(url, state_dir)


async def _written(url: str, state_dir: Path) -> tuple[target.Target, set[str]]:
    """A networked ledger's target and the names of its shards' data that exist."""
    t = _target(url, state_dir)
    if is_postgres_url(url):
        return t, await postgres_target.ledger_schemas(t)
    return t, await redis_target.ledger_names(t)


def shard_ledger_url(url: str, shard: int, shards: int) -> str:
    """The ledger of one coordinator shard. One shard keeps the plain file; with ``n`` shards,
    shard ``i`` of a SQLite ledger lives beside it as ``<name>.shard<i>of<n>.db``, and shard
    ``i`` of a networked ledger under the name ``<namespace>_shard<i>of<n>`` (a PostgreSQL
    schema, a Redis key prefix)."""
    if _networked(url):
        return target.shard_url(url, shard, shards)
    if shards <= 1 or not url.startswith("sqlite:///"):
        return url
    path = Path(url.removeprefix("sqlite:///"))
    return f"sqlite:///{path.with_name(f'{path.stem}.shard{shard}of{shards}{path.suffix}')}"


async def open_written_shards(url: str, state_dir: Path, shards: int) -> list[Ledger]:
    """The ledger of every coordinator shard that has been written (for reads while the cluster
    is down): SQLite shard files, PostgreSQL shard schemas, Redis shard prefixes."""
    if is_sqlite_url(url):
        return [SQLiteLedger(p) for p in shard_paths(url, state_dir, shards) if p.exists()]
    if not _networked(url):
        return []
    _, written = await _written(url, state_dir)
    urls = [shard_ledger_url(url, i, shards) for i in range(shards)]
    return [open_ledger(u, state_dir) for u in urls if _target(u, state_dir).name in written]


def shard_paths(url: str, state_dir: Path, shards: int) -> list[Path]:
    return [ledger_path(shard_ledger_url(url, i, shards), state_dir) for i in range(shards)]


def check_shard_layout(url: str, state_dir: Path, shards: int) -> None:
    """Refuse to start over a ledger written with a different ``coordinator_shards``: flows
    would hash to other shards, whose files (schemas) do not hold their idempotency keys, and
    events already run would run again. A networked ledger is connected to here, so an
    unreachable server fails ``up`` before any actor starts."""
    if _networked(url):
        t, written = target.run_sync(_written(url, state_dir))
        other = sorted(target.shard_counts(t, written) - {shards})
        if other:
            raise LedgerError(
                f"the ledger {t.namespace!r} at {t.safe_url} was written with "
                f"coordinator_shards={other[0]}, the config asks for {shards}: flows would "
                "move to shards that do not hold their event ids. Keep coordinator_shards, or "
                "use a new state_dir or ledger namespace."
            )
        return
    if not is_sqlite_url(url):
        return
    base = ledger_path(url, state_dir)
    pattern = re.compile(rf"^{re.escape(base.stem)}\.shard\d+of(\d+){re.escape(base.suffix)}$")
    found = set()
    if base.parent.is_dir():
        for f in base.parent.iterdir():
            m = pattern.match(f.name)
            if m:
                found.add(int(m.group(1)))
    if base.exists():
        found.add(1)
    other = sorted(found - {shards})
    if other:
        raise LedgerError(
            f"the ledger in {base.parent} was written with coordinator_shards={other[0]}, "
            f"the config asks for {shards}: flows would move to shards that do not hold "
            "their event ids. Keep coordinator_shards, or start with a new state_dir."
        )
