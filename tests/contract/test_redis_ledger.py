"""The Redis ledger's own behaviour beyond the contract: a key prefix per state dir (or per
``?namespace=``), coordinator shards under their own prefixes, resending a write once after a
lost connection without running it twice, closing, and the warning about a server that keeps
nothing on disk. (The shard-layout check and unreachable servers:
``test_server_ledger_shards.py``, for both server ledgers.)"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from actors.errors import LedgerError
from actors.ledger import open_ledger, shard_ledger_url
from actors.ledger.redis import RedisLedger, flow_key, split_flow_key
from actors.ledger.redis_target import parse
from actors.ledger.target import default_namespace
from tests.contract.ledgers import REDIS_URL, drop_keys, fresh_namespace, make_event, require_redis

DEAD_URL = "redis://:s3cret@127.0.0.1:1/0"


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    require_redis()
    r = aioredis.Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


@pytest.fixture
async def namespace(admin: aioredis.Redis) -> AsyncIterator[str]:
    ns = fresh_namespace()
    yield ns
    await drop_keys(ns)


def ledger_at(namespace: str, tmp_path: Path) -> RedisLedger:
    led = open_ledger(f"{REDIS_URL}?namespace={namespace}", tmp_path)
    assert isinstance(led, RedisLedger)
    return led


# -- where the ledger lives ----------------------------------------------------------------
def test_flow_keys_delimit_any_names() -> None:
    cases = [("acme", "ingest", b"e1"), ("a:1", "", b""), ("t\x00", "\u00e9:", b":")]
    for tenant, flow, rest in cases:
        assert split_flow_key(flow_key(tenant, flow) + rest) == (tenant, flow, rest)
    assert flow_key("a", "bc") != flow_key("ab", "c")


def test_the_prefix_is_named_after_the_state_dir_or_the_namespace(tmp_path: Path) -> None:
    assert parse(REDIS_URL, tmp_path / "a").name == default_namespace(tmp_path / "a")
    assert parse(f"{REDIS_URL}?namespace=team_a", tmp_path).name == "team_a"
    assert ledger_at("team_a", tmp_path).prefix == "{team_a}:"
    shard = parse(shard_ledger_url(f"{REDIS_URL}?namespace=ns", 1, 2), tmp_path)
    assert (shard.name, shard.dsn) == ("ns_shard1of2", REDIS_URL)


async def test_odd_names_and_ids_round_trip(namespace: str, tmp_path: Path) -> None:
    led = ledger_at(namespace, tmp_path)
    odd = [make_event("x:y\x00z", "t:1", "f\u00e9"), make_event("", "t", "f"), make_event("1:a")]
    assert await led.claim(odd) == [True, True, True]
    assert sorted(r.key for r in await led.runs()) == sorted(e.key for e in odd)
    assert set(await led.counts()) == {("t:1", "f\u00e9"), ("t", "f"), ("acme", "ingest")}
    assert [e.id for e in await led.pending("t:1", "f\u00e9", 5)] == ["x:y\x00z"]
    await led.close()


# -- connections ---------------------------------------------------------------------------
def test_without_redis_py_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis → ImportError
    monkeypatch.delitem(sys.modules, "actors.ledger.redis")
    with pytest.raises(LedgerError, match=r"pip install 'listener-cluster\[redis\]'"):
        open_ledger(REDIS_URL, tmp_path)


async def test_a_killed_connection_is_replaced_and_the_call_goes_through(
    admin: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    led = ledger_at(namespace, tmp_path)
    await led.claim([make_event("e1")])
    first_id = await led._client.client_id()
    assert await admin.client_kill_filter(_id=first_id) == 1
    assert await led.claim([make_event("e1"), make_event("e2")]) == [False, True]
    assert await led._client.client_id() != first_id
    await led.close()


async def test_a_write_whose_answer_was_lost_is_not_run_twice(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = ledger_at(namespace, tmp_path)
    await led.claim([make_event("old")])
    script = led._scripts["claim"]
    calls = []

    async def run_then_lose(keys: list[str], args: list[bytes]) -> object:
        calls.append(1)
        answer = await script(keys=keys, args=args, client=led._client)  # today's connection
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("connection lost (simulated)")
        return answer

    real_connect = led._connect

    async def connect_and_patch() -> None:
        await real_connect()
        led._scripts["claim"] = run_then_lose

    monkeypatch.setattr(led, "_connect", connect_and_patch)
    batch = [make_event("old"), make_event("n1"), make_event("n2")]
    assert await led.claim(batch) == [False, True, True]  # the first answer, not "duplicate"
    assert len(calls) == 2
    events = (await led.counts())[("acme", "ingest")].events
    assert events == {"seen": 4, "accepted": 3, "duplicate": 1, "rejected": 0}
    await led.close()


async def test_answers_kept_for_resends_expire(
    admin: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    led = ledger_at(namespace, tmp_path)
    await led.claim([make_event("e1")])
    (token_key,) = [k async for k in admin.scan_iter(match=f"{{{namespace}}}:k:*")]
    assert 0 < await admin.ttl(token_key) <= 600
    await led.close()


async def test_close_closes_the_connection(
    admin: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    led = ledger_at(namespace, tmp_path)
    await led.paused()
    client_id = await led._client.client_id()
    await led.close()
    assert str(client_id) not in {str(c["id"]) for c in await admin.client_list()}
    with pytest.raises(LedgerError, match="closed"):
        await led.paused()


async def test_a_server_without_appendonly_is_warned_about(
    admin: aioredis.Redis, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    aof = (await admin.config_get("appendonly")).get("appendonly")
    led = ledger_at(namespace, tmp_path)
    with caplog.at_level(logging.WARNING, logger="actors.ledger.redis"):
        await led.paused()
    await led.close()
    warned = any("without appendonly" in r.getMessage() for r in caplog.records)
    assert warned == (aof != "yes")
