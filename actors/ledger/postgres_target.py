"""Where a PostgreSQL ledger lives: the server (DSN), the schema, and which shards exist.

A ledger URL is ``postgresql://user@host:port/db`` with two optional query parameters of ours,
removed before the DSN reaches the driver:

- ``namespace=<name>``: the schema holding the ledger's tables. Without it the schema is
  ``listeners_<hash>``, the hash of the resolved state dir (the same hash that names the
  cluster's Ray namespace), so clusters with different state dirs share a database without
  seeing each other's event ids, and a cluster restarted on its state dir finds its ledger.
- ``shard=<i>of<n>``: set by :func:`shard_url` for coordinator shard ``i`` of ``n``, whose
  tables live in the schema ``<schema>_shard<i>of<n>`` (as SQLite shards live in
  ``ledger.shard<i>of<n>.db`` beside ``ledger.db``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from actors.errors import LedgerError

T = TypeVar("T")
SCHEMES = ("postgresql", "postgres")
INSTALL_HINT = "pip install 'listener-cluster[postgres]'"
_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_SHARD = re.compile(r"^(\d+)of(\d+)$")


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in SCHEMES


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (userinfo and ``password=`` parameters)."""
    masked = re.sub(r"(password=)[^&\s]*", r"\1***", url, flags=re.IGNORECASE)
    parts = urlsplit(masked)
    if parts.password is None:
        return masked
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def default_namespace(state_dir: Path | str) -> str:
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return f"listeners_{digest}"


@dataclass(frozen=True, slots=True)
class PgTarget:
    dsn: str  # what asyncpg connects to (our parameters removed)
    schema: str  # the base schema (shard 0 of 1)
    shard: tuple[int, int] | None = None

    @property
    def table_schema(self) -> str:
        """The schema holding this shard's tables."""
        if self.shard is None:
            return self.schema
        return f"{self.schema}_shard{self.shard[0]}of{self.shard[1]}"

    @property
    def safe_url(self) -> str:
        return mask_url(self.dsn)


def parse(url: str, state_dir: Path | str) -> PgTarget:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise LedgerError(f"not a postgresql ledger URL: {mask_url(url)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("namespace", "shard")}
    rest = [(k, v) for k, v in query if k not in ("namespace", "shard")]
    namespace = ours.get("namespace") or default_namespace(state_dir)
    if not _NAMESPACE.match(namespace):
        raise LedgerError(
            f"ledger namespace {namespace!r} in {mask_url(url)!r} is not a schema name: use "
            "1-40 lowercase letters, digits and underscores, not starting with a digit"
        )
    shard = None
    if "shard" in ours:
        m = _SHARD.match(ours["shard"])
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise LedgerError(f"bad shard {ours['shard']!r} in {mask_url(url)!r}")
        shard = (int(m.group(1)), int(m.group(2)))
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    return PgTarget(dsn=dsn, schema=namespace, shard=shard)


def shard_url(url: str, shard: int, shards: int) -> str:
    """The URL of coordinator shard ``shard`` of ``shards`` (unchanged for one shard)."""
    if shards <= 1:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "shard"]
    query.append(("shard", f"{shard}of{shards}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def connect(target: PgTarget, timeout: float = 10.0) -> Any:
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


async def ledger_schemas(target: PgTarget) -> set[str]:
    """The schemas of this ledger (the base one and its shards') that hold a ``runs`` table.
    Connecting checks the server answers."""
    conn = await connect(target)
    try:
        rows = await conn.fetch(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'runs' "
            "AND (table_schema = $1 OR table_schema LIKE $2)",
            target.schema,
            target.schema.replace("_", r"\_") + r"\_shard%",
        )
    finally:
        await conn.close()
    return {row["table_schema"] for row in rows}


async def shard_counts(target: PgTarget) -> set[int]:
    """The ``coordinator_shards`` values this ledger was written with; empty for a new one."""
    pattern = re.compile(rf"^{re.escape(target.schema)}_shard\d+of(\d+)$")
    found: set[int] = set()
    for name in await ledger_schemas(target):
        if name == target.schema:
            found.add(1)
        elif m := pattern.match(name):
            found.add(int(m.group(1)))
    return found


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ledger-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
