"""Fresh ledger stores of every backend, for the ledger contract suites.

A test asks for ``stores`` (parametrized over the backends) and calls it for a new, empty
store: a SQLite file in the test's tmp dir, a PostgreSQL schema of its own in the ``test``
database, or a Redis key prefix of its own. ``store.open()`` gives a new connection to that
store (reopening after ``close``, or a second writer); schemas and keys are dropped when the
test ends. Tests of a server backend skip when the server does not answer, and fail when
``CI`` is set.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from actors.ledger import Finish, Ledger, open_ledger
from tests.contract.base import require_service
from tests.unit.helpers import make_event

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
PG_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
BACKENDS = ["sqlite", "postgresql", "redis"]


def fresh_namespace() -> str:
    return f"ledger_test_{uuid.uuid4().hex[:12]}"


async def drop_schemas(prefix: str) -> None:
    """Drop the schema ``prefix`` and its shard schemas ``prefix_shard...``."""
    import asyncpg

    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        names = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = $1 OR nspname LIKE $2",
            prefix,
            prefix.replace("_", r"\_") + r"\_shard%",
        )
        for (name,) in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def drop_keys(prefix: str) -> None:
    """Delete a Redis ledger's keys: ``{prefix}:...`` and its shards' ``{prefix_shard...}:...``."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        for pattern in (f"{{{prefix}}}:*", f"{{{prefix}_shard*"):
            keys = [k async for k in r.scan_iter(match=pattern, count=1000)]
            if keys:
                await r.delete(*keys)
    finally:
        await r.aclose()


async def drop_store(backend: str, namespace: str) -> None:
    """Remove everything a server ledger named ``namespace`` wrote."""
    await (drop_schemas if backend == "postgresql" else drop_keys)(namespace)


def require_postgres() -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)


def require_redis() -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)


@dataclass
class Store:
    """One empty ledger store of one backend."""

    backend: str
    url: str
    state_dir: Path
    namespace: str | None = None

    def open(self) -> Ledger:
        return open_ledger(self.url, self.state_dir)


@dataclass
class Stores:
    backend: str
    base: Path
    made: list[Store] = field(default_factory=list)

    def __call__(self) -> Store:
        state_dir = self.base / f"state{len(self.made)}"
        if self.backend == "sqlite":
            store = Store("sqlite", f"sqlite:///{state_dir / 'ledger.db'}", state_dir)
        else:
            ns = fresh_namespace()
            url = PG_URL if self.backend == "postgresql" else REDIS_URL
            store = Store(self.backend, f"{url}?namespace={ns}", state_dir, ns)
        self.made.append(store)
        return store

    def cleanup(self) -> None:
        for store in self.made:
            if store.namespace:
                asyncio.run(drop_store(store.backend, store.namespace))


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Make fresh stores of one backend (each test runs once per backend)."""
    if request.param == "postgresql":
        require_postgres()
    elif request.param == "redis":
        require_redis()
    made = Stores(request.param, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


# -- helpers of the contract tests ---------------------------------------------------------
KEY = ("acme", "ingest", "e1")


@pytest.fixture
async def ledger(stores: Callable[[], Store]) -> AsyncIterator[Ledger]:
    led = stores().open()
    yield led
    await led.close()


async def state_of(ledger: Ledger, key: tuple[str, str, str] = KEY) -> tuple[str, int]:
    (rec,) = [r for r in await ledger.runs() if r.key == key]
    return rec.state.value, rec.attempts


def fail(attempt: int, retry: bool = True, key: tuple[str, str, str] = KEY) -> Finish:
    return Finish(key, attempt, ok=False, error="boom", retry_at=1.0 if retry else None)


async def dead(ledger: Ledger, event_id: str) -> None:
    key = ("acme", "ingest", event_id)
    await ledger.claim([make_event(event_id)])
    await ledger.start(key, 0)
    await ledger.finish([fail(1, retry=False, key=key)])
