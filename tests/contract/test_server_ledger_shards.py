"""What the PostgreSQL and Redis ledgers share beyond the contract, tested once for both: the
shard-layout check `up` runs before any actor starts, reading the shards that were written
while the cluster is down, and connection errors that name the server without its password."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.errors import LedgerError
from actors.ledger import (
    Ledger,
    check_shard_layout,
    open_ledger,
    open_written_shards,
    shard_ledger_url,
)
from tests.contract.ledgers import (
    PG_URL,
    REDIS_URL,
    drop_store,
    fresh_namespace,
    make_event,
    require_postgres,
    require_redis,
)

LIVE = {"postgresql": (PG_URL, require_postgres), "redis": (REDIS_URL, require_redis)}
# Nothing listens on port 1; the password must never show, the rest of the URL must.
DEAD = {
    "postgresql": (
        "postgresql://postgres:s3cret@127.0.0.1:1/test",
        r"postgres:\*\*\*@127\.0\.0\.1:1/test",
    ),
    "redis": ("redis://:s3cret@127.0.0.1:1/0", r"redis://:\*\*\*@127\.0\.0\.1:1/0"),
}


@pytest.fixture(params=sorted(LIVE))
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace of one server ledger (and ``<it>x``, dropped too)."""
    base, require = LIVE[request.param]
    require()
    namespace = fresh_namespace()
    yield f"{base}?namespace={namespace}"
    for name in (namespace, namespace + "x"):
        asyncio.run(drop_store(request.param, name))


async def write_shards(url: str, tmp_path: Path, which: list[int], of: int) -> None:
    for i in which:
        shard = open_ledger(shard_ledger_url(url, i, of), tmp_path)
        await shard.claim([make_event(f"s{i}")])
        await shard.close()


async def ids_in(found: list[Ledger]) -> list[list[str]]:
    try:
        return [[r.event.id for r in await led.runs()] for led in found]
    finally:
        for led in found:
            await led.close()


async def test_a_changed_shard_count_is_refused(url: str, tmp_path: Path) -> None:
    check_shard_layout(url, tmp_path, 2)  # nothing written yet: any layout is fine
    await write_shards(url, tmp_path, [0, 1], 2)
    check_shard_layout(url, tmp_path, 2)
    with pytest.raises(LedgerError, match=r"coordinator_shards=2.*asks for 1"):
        check_shard_layout(url, tmp_path, 1)
    check_shard_layout(url + "x", tmp_path, 1)  # another namespace
    assert await ids_in(await open_written_shards(url, tmp_path, 2)) == [["s0"], ["s1"]]


async def test_reads_while_down_find_every_written_shard(url: str, tmp_path: Path) -> None:
    assert await open_written_shards(url, tmp_path, 3) == []
    await write_shards(url, tmp_path, [0, 2], 3)
    assert await ids_in(await open_written_shards(url, tmp_path, 3)) == [["s0"], ["s2"]]


@pytest.mark.parametrize("backend", sorted(DEAD))
async def test_an_unreachable_server_is_named_without_its_password(
    backend: str, tmp_path: Path
) -> None:
    dead_url, shown = DEAD[backend]
    led = open_ledger(dead_url, tmp_path)
    with pytest.raises(LedgerError, match=shown) as err:
        await led.claim([make_event("e1")])
    assert "s3cret" not in str(err.value)
    with pytest.raises(LedgerError, match=r"cannot connect.*127\.0\.0\.1:1") as err:
        check_shard_layout(dead_url, tmp_path, 1)  # what `up` runs before any actor starts
    assert "s3cret" not in str(err.value)
    await led.close()
