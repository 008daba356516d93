"""The clock contract for ``redis-stream`` (consumer groups) against the real Redis on loopback,
plus what only a consumer group does: a dead consumer's pending entries are taken over."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.clocks import CLOCK_TYPES, ClockSpec, CursorStore
from actors.clocks.redis_stream import RedisStreamClock, mask_url
from tests.contract.base import ClockContract, Harness, SourceDriver, require_service, wait_state
from tests.contract.proxy import TcpProxy

HOST, PORT = "127.0.0.1", 6379


class RedisStreamDriver(SourceDriver):
    clock_type = "redis-stream"
    host, port = HOST, PORT

    def __init__(self) -> None:
        super().__init__()
        self.redis = aioredis.Redis(host=HOST, port=PORT)

    async def teardown(self) -> None:
        await self.redis.delete(self.name)
        await self.redis.aclose()

    def options(self, host: str, port: int) -> dict[str, Any]:
        return {
            "url": f"redis://{host}:{port}/0",
            "stream": self.name,
            "block_ms": 200,
            "claim_idle_ms": 500,
        }

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.redis.xadd(self.name, {"data": json.dumps(payload), "origin": "contract"})

    async def publish_malformed(self) -> None:
        await self.redis.xadd(self.name, {"data": b"{not json"})


class TestRedisStreamContract(ClockContract):
    redelivery_timeout = 10.0

    @pytest.fixture
    def driver(self) -> RedisStreamDriver:
        require_service("Redis", HOST, PORT)
        return RedisStreamDriver()


@pytest.fixture
async def stream() -> AsyncIterator[RedisStreamDriver]:
    require_service("Redis", HOST, PORT)
    driver = RedisStreamDriver()
    yield driver
    await driver.teardown()


async def start_clock(driver: RedisStreamDriver, tmp_path: Path, **options: Any) -> Harness:
    spec = ClockSpec(
        tenant="t",
        flow="f",
        name="c",
        type="redis-stream",
        options={**driver.options(HOST, PORT), **options},
    )
    clock = CLOCK_TYPES["redis-stream"](spec, CursorStore.for_clock(tmp_path, spec))
    return await Harness(clock).start()


async def test_a_dead_consumers_pending_entries_are_claimed_by_another_consumer(
    stream: RedisStreamDriver, tmp_path: Path
) -> None:
    dead = await start_clock(stream, tmp_path, consumer="dead")
    await wait_state(dead.clock, "listening")
    for i in range(3):
        await stream.publish({"n": i})
    first = await dead.take(3)
    await dead.stop()  # crashed between receive and ack: the entries stay pending under "dead"

    heir = await start_clock(stream, tmp_path, consumer="heir", claim_idle_ms=300)
    try:
        claimed = await heir.take(3, timeout=10)
        assert {e.id for e in claimed.events} == {e.id for e in first.events}
        await heir.ack_all()
        pending = await stream.redis.xpending(stream.name, "listeners")
        assert pending["pending"] == 0
    finally:
        await heir.stop()


async def test_entries_published_before_the_group_exists_are_read_with_start_zero(
    stream: RedisStreamDriver, tmp_path: Path
) -> None:
    await stream.publish({"n": 1})
    h = await start_clock(stream, tmp_path, start="0")
    try:
        got = await h.take(1)
        assert got.events[0].payload["body"] == {"n": 1}
        assert got.events[0].payload["fields"] == {"origin": "contract"}
        assert got.events[0].id == f"{stream.name}:{got.events[0].payload['entry_id']}"
    finally:
        await h.stop()


async def test_an_entry_without_the_body_field_or_too_large_is_rejected(
    stream: RedisStreamDriver, tmp_path: Path
) -> None:
    h = await start_clock(stream, tmp_path, max_bytes=64)
    try:
        await wait_state(h.clock, "listening")
        await stream.redis.xadd(stream.name, {"other": "x"})
        await stream.redis.xadd(stream.name, {"data": '{"big": "' + "x" * 100 + '"}'})
        await stream.redis.xadd(stream.name, {"data": "[1, 2]"})
        got = await h.take(0, rejections=3)
        assert [r.reason for r in got.rejections] == ["malformed", "too_large", "malformed"]
        assert "no field 'data'" in got.rejections[0].detail
    finally:
        await h.stop()


async def test_credentials_come_from_the_environment_and_never_show(
    stream: RedisStreamDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTRACT_REDIS_URL", raising=False)
    h = await start_clock(stream, tmp_path, url_env="CONTRACT_REDIS_URL")
    try:
        await wait_state(h.clock, "degraded")
        assert "CONTRACT_REDIS_URL" in (h.clock.error or "")
    finally:
        await h.stop()
    unused = TcpProxy(HOST, PORT)  # a port that refuses connections once cut
    unused.cut()
    monkeypatch.setenv("CONTRACT_REDIS_URL", f"redis://app:s3cret@127.0.0.1:{unused.port}/0")
    h = await start_clock(stream, tmp_path, url_env="CONTRACT_REDIS_URL")
    try:
        await wait_state(h.clock, "degraded")
        shown = f"{h.clock.error} {h.clock.source}"
        assert "app:***@" in shown and "s3cret" not in shown
    finally:
        await h.stop()
        unused.close()


def test_bad_options_are_named_and_passwords_are_masked() -> None:
    with pytest.raises(ValueError, match="'stream'"):
        RedisStreamClock.check_options({})
    with pytest.raises(ValueError, match="'claim_idle_ms'"):
        RedisStreamClock.check_options({"stream": "s", "claim_idle_ms": 0})
    with pytest.raises(ValueError, match="'start'"):
        RedisStreamClock.check_options({"stream": "s", "start": "latest"})
    with pytest.raises(ValueError, match="unknown option 'topic'"):
        RedisStreamClock.check_options({"stream": "s", "topic": "x"})
    assert mask_url("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert mask_url("redis://:secret@h/0") == "redis://:***@h/0"
