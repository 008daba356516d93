"""Where a PostgreSQL ledger lives: its tables are in the schema named by the ledger's
namespace (see :mod:`actors.ledger.target`), one schema per coordinator shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from actors.errors import LedgerError
from actors.ledger.target import Target
from actors.ledger.target import parse as parse_target

SCHEMES = ("postgresql", "postgres")
INSTALL_HINT = "pip install 'listener-cluster[postgres]'"

__all__ = ["INSTALL_HINT", "SCHEMES", "connect", "is_postgres_url", "ledger_schemas", "parse"]


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in SCHEMES


def parse(url: str, state_dir: Path | str) -> Target:
    return parse_target(url, state_dir, SCHEMES)


async def connect(target: Target, timeout: float = 10.0) -> Any:
    """An asyncpg connection, or a :class:`LedgerError` naming the URL (never its password)."""
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - the postgres extra is not installed
        raise LedgerError(
            f"the postgresql ledger needs asyncpg, which is not installed: {INSTALL_HINT}"
        ) from exc
    try:
        return await asyncpg.connect(
            target.dsn,
            timeout=timeout,
            server_settings={"application_name": "listener-cluster ledger"},
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).replace(target.dsn, target.safe_url) or type(exc).__name__
        raise LedgerError(
            f"cannot connect to the postgresql ledger at {target.safe_url}: {reason}"
        ) from exc


async def ledger_schemas(target: Target) -> set[str]:
    """The schemas of this ledger (the base one and its shards') that hold a ``runs`` table.
    Connecting checks the server answers."""
    conn = await connect(target)
    try:
        rows = await conn.fetch(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'runs' "
            "AND (table_schema = $1 OR table_schema LIKE $2)",
            target.namespace,
            target.namespace.replace("_", r"\_") + r"\_shard%",
        )
    finally:
        await conn.close()
    return {row["table_schema"] for row in rows}
