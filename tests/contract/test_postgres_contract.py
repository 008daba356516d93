"""The clock contract for ``postgres`` (outbox table + LISTEN/NOTIFY) against the real server,
plus its own behaviour: whole-row bodies, late commits, ``where``, NOTIFY wake-ups."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from actors.clocks import ClockSpec, CursorStore
from actors.clocks.postgres import PostgresClock, find_holes, mask_dsn
from tests.contract.base import ClockContract, Harness, SourceDriver, require_service, wait_state

HOST, PORT, DATABASE = "127.0.0.1", 5432, "test"


def dsn(port: int = PORT, password: str = "") -> str:
    auth = f"postgres:{password}" if password else "postgres"
    return f"postgresql://{auth}@{HOST}:{port}/{DATABASE}"


class PostgresDriver(SourceDriver):
    """A fresh outbox table per test: ``id bigserial``, ``body text`` (the JSON message)."""

    clock_type = "postgres"
    host, port = HOST, PORT

    def __init__(self) -> None:
        super().__init__()
        self.name = self.name.replace("-", "_")  # a table name and a NOTIFY channel
        self.conn: asyncpg.Connection | None = None

    async def setup(self) -> None:
        self.conn = await asyncpg.connect(dsn())
        await self.conn.execute(
            f"CREATE TABLE {self.name} (id bigserial PRIMARY KEY, body text NOT NULL, "
            "kind text NOT NULL DEFAULT 'order')"
        )

    async def teardown(self) -> None:
        if self.conn is not None:
            await self.conn.execute(f"DROP TABLE IF EXISTS {self.name}")
            await self.conn.close()

    def options(self, host: str, port: int) -> dict[str, Any]:
        return {
            "dsn": f"postgresql://postgres@{host}:{port}/{DATABASE}",
            "table": self.name,
            "channel": self.name,
            "body_column": "body",
            "poll_interval": 0.2,
        }

    async def insert(self, body: str, kind: str = "order") -> int:
        assert self.conn is not None
        row_id = await self.conn.fetchval(
            f"INSERT INTO {self.name} (body, kind) VALUES ($1, $2) RETURNING id", body, kind
        )
        await self.conn.execute(f"NOTIFY {self.name}")
        return int(row_id)

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.insert(json.dumps(payload))

    async def publish_malformed(self) -> None:
        await self.insert("{not json")


class TestPostgresContract(ClockContract):
    redelivery_timeout = 10.0

    @pytest.fixture
    def driver(self) -> PostgresDriver:
        require_service("PostgreSQL", HOST, PORT)
        return PostgresDriver()


# -- connector-specific behaviour ---------------------------------------------------------------


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[PostgresDriver]:
    require_service("PostgreSQL", HOST, PORT)
    driver = PostgresDriver()
    await driver.setup()
    yield driver
    await driver.teardown()


@pytest.fixture
async def clock_for(table: PostgresDriver, tmp_path: Path) -> AsyncIterator[Any]:
    harnesses: list[Harness] = []

    async def make(**options: Any) -> Harness:
        opts = {"dsn": dsn(), "table": table.name, "poll_interval": 0.1, **options}
        spec = ClockSpec(tenant="t", flow="f", name="pg", type="postgres", options=opts)
        h = await Harness(PostgresClock(spec, CursorStore.for_clock(tmp_path, spec))).start()
        harnesses.append(h)
        await wait_state(h.clock, "listening")
        return h

    yield make
    for h in harnesses:
        await h.stop()


async def test_whole_row_mode_turns_column_types_into_json(
    table: PostgresDriver, clock_for: Any
) -> None:
    assert table.conn is not None
    await table.conn.execute(
        f"ALTER TABLE {table.name} ADD COLUMN at timestamptz, ADD COLUMN amount numeric, "
        "ADD COLUMN ref uuid, ADD COLUMN blob bytea, ADD COLUMN doc jsonb, ADD COLUMN tags text[]"
    )
    await table.conn.execute(
        f"INSERT INTO {table.name} (body, at, amount, ref, blob, doc, tags) VALUES ('plain', "
        "'2024-05-01 12:00:00+00', 12.50, 'a8098c1a-f86e-11da-bd1a-00112444be1e', '\\x0102', "
        """'{"k": [1, 2]}', '{a,b}')"""
    )
    h = await clock_for()
    got = await h.take(1)
    event = got.events[0]
    assert event.id == f"{table.name}:1"
    assert event.payload == {
        "table": table.name,
        "id": 1,
        "body": {
            "id": 1,
            "body": "plain",
            "kind": "order",
            "at": "2024-05-01T12:00:00+00:00",
            "amount": "12.50",
            "ref": "a8098c1a-f86e-11da-bd1a-00112444be1e",
            "blob": "AQI=",
            "doc": {"k": [1, 2]},
            "tags": ["a", "b"],
        },
    }


async def test_columns_option_limits_the_body_to_those_columns(
    table: PostgresDriver, clock_for: Any
) -> None:
    await table.insert("hello", kind="invoice")
    h = await clock_for(columns=["kind"])
    got = await h.take(1)
    assert got.events[0].payload["body"] == {"id": 1, "kind": "invoice"}


async def test_a_row_without_a_json_form_is_rejected_and_acked(
    table: PostgresDriver, clock_for: Any
) -> None:
    assert table.conn is not None
    await table.conn.execute(f"ALTER TABLE {table.name} ADD COLUMN ratio float8")
    await table.conn.execute(f"INSERT INTO {table.name} (body, ratio) VALUES ('x', 'NaN')")
    await table.conn.execute(f"INSERT INTO {table.name} (body, ratio) VALUES ('y', 0.5)")
    h = await clock_for()
    got = await h.take(1, rejections=1)
    assert [r.ref for r in got.rejections] == [f"{table.name}:1"]
    assert got.rejections[0].reason == "malformed" and "nan" in got.rejections[0].detail.lower()
    assert got.events[0].payload["body"]["ratio"] == 0.5
    await h.ack_all()
    await h.stop()
    again = await clock_for()
    assert len(await again.quiet(1.0)) == 0


async def test_a_row_over_max_bytes_is_rejected_as_too_large(
    table: PostgresDriver, clock_for: Any
) -> None:
    await table.publish({"blob": "x" * 500})
    await table.publish({"n": 1})
    h = await clock_for(body_column="body", max_bytes=200)
    got = await h.take(1, rejections=1)
    assert got.rejections[0].reason == "too_large"
    assert got.events[0].payload["body"] == {"n": 1}


async def test_a_late_commit_below_the_cursor_is_still_delivered(
    table: PostgresDriver, clock_for: Any
) -> None:
    h = await clock_for(body_column="body", channel=table.name)
    await table.publish({"n": 0})
    await h.take(1)
    await h.ack_all()
    late = await asyncpg.connect(dsn())
    try:
        tx = late.transaction()
        await tx.start()
        late_id = await late.fetchval(
            f"""INSERT INTO {table.name} (body) VALUES ('{{"n": 1}}') RETURNING id"""
        )
        await table.publish({"n": 2})  # a higher id, committed first
        first = await h.take(1)
        assert [e.payload["body"] for e in first.events] == [{"n": 2}]
        await h.ack_all()
        await tx.commit()
        second = await h.take(1)
        assert [e.id for e in second.events] == [f"{table.name}:{late_id}"]
        await h.ack_all()
        await h.stop()
    finally:
        await late.close()
    again = await clock_for(body_column="body")
    assert len(await again.quiet(1.0)) == 0


async def test_where_delivers_only_matching_rows_and_resumes_past_the_others(
    table: PostgresDriver, clock_for: Any
) -> None:
    for n, kind in enumerate(["order", "audit", "audit", "order"]):
        await table.insert(json.dumps({"n": n}), kind=kind)
    h = await clock_for(body_column="body", where="kind = 'order'")
    got = await h.take(2)
    assert sorted(e.payload["body"]["n"] for e in got.events) == [0, 3]
    assert h.clock._holes == {}  # filtered rows are read, not missing
    await h.ack_all()
    await h.stop()
    again = await clock_for(body_column="body", where="kind = 'order'")
    assert len(await again.quiet(1.0)) == 0


async def test_notify_wakes_the_clock_long_before_the_poll_interval(
    table: PostgresDriver, clock_for: Any
) -> None:
    h = await clock_for(body_column="body", channel=table.name, poll_interval=120)
    await table.publish({"n": 7})
    got = await h.take(1, timeout=15)
    assert got.events[0].payload["body"] == {"n": 7}


async def test_a_restarted_iteration_of_the_same_clock_rereads_unacked_rows(
    table: PostgresDriver, tmp_path: Path
) -> None:
    await table.publish({"n": 1})
    await table.publish({"n": 2})
    opts = {"dsn": dsn(), "table": table.name, "body_column": "body", "poll_interval": 0.1}
    spec = ClockSpec(tenant="t", flow="f", name="pg", type="postgres", options=opts)
    clock = PostgresClock(spec, CursorStore.for_clock(tmp_path, spec))
    await clock.open()
    try:
        first = clock.batches()
        seen = [e.id for e in (await anext(first)).events]
        await first.aclose()  # the host's task crashed before the ack
        again = clock.batches()
        assert [e.id for e in (await anext(again)).events] == seen
        await again.aclose()
    finally:
        await clock.close()
    assert seen == [f"{table.name}:1", f"{table.name}:2"]


async def test_password_is_masked_in_the_source_and_the_degraded_reason(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        closed_port = s.getsockname()[1]
    secret = "s3cr3t-pw"
    opts = {"dsn": dsn(closed_port, password=secret), "table": "outbox"}
    spec = ClockSpec(tenant="t", flow="f", name="pg", type="postgres", options=opts)
    h = await Harness(PostgresClock(spec, CursorStore.for_clock(tmp_path, spec))).start()
    try:
        await wait_state(h.clock, "degraded")
        assert h.clock.error and "cannot reach PostgreSQL" in h.clock.error
        assert secret not in h.clock.error and secret not in h.clock.source
        assert "postgres:***@" in h.clock.source
    finally:
        await h.stop()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "table"),
        ({"table": "a;drop"}, "table"),
        ({"table": "t", "where": "true; DROP TABLE t"}, "where"),
        ({"table": "t", "where": "x = 1 -- comment"}, "where"),
        ({"table": "t", "columns": ["a"], "body_column": "b"}, "columns"),
        ({"table": "t", "channel": "bad channel"}, "channel"),
        ({"table": "t", "poll_interval": 0}, "poll_interval"),
        ({"table": "t", "max_batch": 0}, "max_batch"),
        ({"table": "t", "dsn": "mysql://x"}, "dsn"),
        ({"table": "t", "tabel": "t"}, "tabel"),
    ],
)
def test_bad_options_are_rejected_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PostgresClock.check_options(options)


def test_holes_are_the_ids_a_read_skipped() -> None:
    assert find_holes(None, [5, 6, 9]) == [7, 8]
    assert find_holes(3, [5, 6]) == [4]
    assert find_holes(10, [11, 12]) == []
    assert find_holes(0, [10_000], cap=3) == [9_997, 9_998, 9_999]


def test_mask_dsn_hides_passwords_in_userinfo_and_parameters() -> None:
    assert mask_dsn("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_dsn("postgresql://u@h/db?password=pw") == "postgresql://u@h/db?password=***"
