"""The PostgreSQL ledger's own behaviour beyond the contract: a schema per state dir (or per
``?namespace=``), coordinator shards in their own schemas, clear connection errors,
reconnecting, closing, and commit durability. (The shard-layout check and unreachable servers:
``test_server_ledger_shards.py``, for both server ledgers.)"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from actors.errors import LedgerError
from actors.ledger import (
    open_ledger,
    shard_ledger_url,
)
from actors.ledger.postgres import PostgresLedger
from actors.ledger.postgres_target import parse
from actors.ledger.target import default_namespace, mask_url
from cluster.bootstrap import namespace_for
from tests.contract.ledgers import (
    PG_URL,
    drop_schemas,
    fresh_namespace,
    make_event,
    require_postgres,
)

DEAD_URL = "postgresql://postgres:s3cret@127.0.0.1:1/test"


@pytest.fixture
async def pg() -> AsyncIterator[asyncpg.Connection]:
    """An admin connection to the test database."""
    require_postgres()
    conn = await asyncpg.connect(PG_URL)
    yield conn
    await conn.close()


@pytest.fixture
async def namespace(pg: asyncpg.Connection) -> AsyncIterator[str]:
    ns = fresh_namespace()
    yield ns
    await drop_schemas(ns)


# -- where the ledger lives ----------------------------------------------------------------
def test_the_schema_is_named_after_the_resolved_state_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert parse(PG_URL, a).namespace == default_namespace(a) != default_namespace(b)
    assert parse(PG_URL, tmp_path / "x" / ".." / "a").namespace == default_namespace(a)
    # the same hash as the cluster's Ray namespace, so one can be told from the other
    assert default_namespace(a).split("_")[1] == namespace_for(a).split("-")[1]


def test_the_namespace_parameter_names_the_schema_and_is_not_sent_to_the_server(
    tmp_path: Path,
) -> None:
    target = parse(f"{PG_URL}?namespace=team_a&sslmode=disable", tmp_path)
    assert (target.namespace, target.name) == ("team_a", "team_a")
    assert target.dsn == f"{PG_URL}?sslmode=disable"


@pytest.mark.parametrize("bad", ["Team", "1abc", "a-b", "x" * 41, "a;drop"])
def test_a_namespace_that_is_not_a_plain_schema_name_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(LedgerError, match="not a schema name"):
        parse(f"{PG_URL}?namespace={bad}", tmp_path)


def test_each_shard_gets_its_own_schema(tmp_path: Path) -> None:
    url = f"{PG_URL}?namespace=ns"
    assert shard_ledger_url(url, 0, 1) == url
    schemas = [parse(shard_ledger_url(url, i, 3), tmp_path).name for i in range(3)]
    assert schemas == ["ns_shard0of3", "ns_shard1of3", "ns_shard2of3"]
    assert "shard" not in parse(shard_ledger_url(url, 1, 3), tmp_path).dsn


# -- connections ---------------------------------------------------------------------------
def test_passwords_are_masked_in_urls() -> None:
    assert (
        mask_url("postgresql://u:pw@h:5/db?password=x") == "postgresql://u:***@h:5/db?password=***"
    )
    assert mask_url(PG_URL) == PG_URL


async def test_a_missing_database_is_a_clear_error(pg: asyncpg.Connection, tmp_path: Path) -> None:
    led = open_ledger("postgresql://postgres@127.0.0.1:5432/no_such_db_here", tmp_path)
    with pytest.raises(LedgerError, match="no_such_db_here"):
        await led.counts()
    await led.close()


def test_without_asyncpg_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg → ImportError
    monkeypatch.delitem(sys.modules, "actors.ledger.postgres")
    with pytest.raises(LedgerError, match=r"pip install 'listener-cluster\[postgres\]'"):
        open_ledger(PG_URL, tmp_path)


async def test_a_lost_connection_fails_one_call_and_the_next_reconnects(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path
) -> None:
    led = open_ledger(f"{PG_URL}?namespace={namespace}", tmp_path)
    assert isinstance(led, PostgresLedger)
    await led.claim([make_event("e1")])
    pid = await led._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
    # Either the call finds the connection gone and fails (it sent nothing that committed),
    # or the driver had already seen the server's goodbye and the call opened a new one.
    try:
        first = await led.claim([make_event("e2")])
    except LedgerError as exc:
        assert "lost the connection" in str(exc)
        first = []
    assert await led.claim([make_event("e1"), make_event("e2")]) == [False, first == []]
    assert await led._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()")) != pid
    await led.close()


async def test_close_closes_the_connection(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path
) -> None:
    led = open_ledger(f"{PG_URL}?namespace={namespace}", tmp_path)
    await led.paused()
    assert isinstance(led, PostgresLedger)
    pid = await led._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
    await led.close()
    alive = await pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    assert alive == 0
    with pytest.raises(LedgerError, match="closed"):
        await led.paused()


async def test_commits_are_synchronous_even_when_the_session_asks_otherwise(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path
) -> None:
    led = open_ledger(f"{PG_URL}?namespace={namespace}&synchronous_commit=off", tmp_path)
    assert isinstance(led, PostgresLedger)
    setting = await led._run(lambda conn: conn.fetchval("SHOW synchronous_commit"))
    assert setting == "on"
    await led.close()


# -- a connection lost while COMMIT is in flight -------------------------------------------
class CommitThenLose:
    """Stands in for ``PostgresLedger._run`` once: runs the call, then loses the answer
    (``commit=True``: it committed), or runs it in a transaction rolled back afterwards
    (``commit=False``: the COMMIT never reached the disk)."""

    def __init__(self, led: PostgresLedger, commit: bool) -> None:
        self.led, self.commit, self.real = led, commit, led._run

    async def __call__(self, op):  # type: ignore[no-untyped-def]
        self.led._run = self.real  # type: ignore[method-assign]
        if self.commit:
            await self.real(op)
        else:

            async def rolled_back(conn: asyncpg.Connection) -> None:
                tr = conn.transaction()
                await tr.start()
                await op(conn)  # its own transaction is a savepoint inside ours
                await tr.rollback()

            await self.real(rolled_back)
        raise LedgerError("lost the connection (simulated)")


@pytest.mark.parametrize("committed", [True, False])
async def test_a_claim_whose_commit_answer_was_lost_tells_what_happened(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path, committed: bool
) -> None:
    led = open_ledger(f"{PG_URL}?namespace={namespace}", tmp_path)
    assert isinstance(led, PostgresLedger)
    await led.claim([make_event("old")])
    led._run = CommitThenLose(led, committed)  # type: ignore[method-assign]
    batch = [make_event("old"), make_event("n1"), make_event("n2")]
    if committed:  # the answer stands: a resend would call n1, n2 duplicates and never run them
        assert await led.claim(batch) == [False, True, True]
    else:
        with pytest.raises(LedgerError, match="did not commit"):
            await led.claim(batch)
        assert await led.claim(batch) == [False, True, True]  # the resend claims them
    assert sorted(e.id for e in await led.pending("acme", "ingest", 10)) == ["n1", "n2", "old"]
    await led.close()


async def test_a_server_error_is_a_ledger_error_and_the_connection_stays(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path
) -> None:
    led = open_ledger(f"{PG_URL}?namespace={namespace}", tmp_path)
    await led.claim([make_event("e1")])
    await pg.execute(f'ALTER TABLE "{namespace}".flows RENAME TO flows_gone')
    with pytest.raises(LedgerError, match="refused a call"):
        await led.paused()
    await pg.execute(f'ALTER TABLE "{namespace}".flows_gone RENAME TO flows')
    assert await led.paused() == set()
    await led.close()


async def test_a_schema_the_user_may_not_create_is_a_clear_error(
    pg: asyncpg.Connection, namespace: str, tmp_path: Path
) -> None:
    role = f"ledger_reader_{namespace[-6:]}"
    await pg.execute(f"CREATE ROLE {role} LOGIN")
    try:
        url = f"postgresql://{role}@127.0.0.1:5432/test?namespace={namespace}"
        led = open_ledger(url, tmp_path)
        with pytest.raises(LedgerError, match=rf"cannot prepare.*schema {namespace}"):
            await led.claim([make_event("e1")])
        await led.close()
    finally:
        await pg.execute(f"DROP ROLE {role}")
