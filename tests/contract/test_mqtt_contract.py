"""The clock contract for ``mqtt`` against the real Mosquitto on loopback, plus MQTT specifics:
ids from the payload or its hash, manual acks on a persistent session, QoS 2, limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from actors.clocks import ClockSpec, CursorStore
from actors.clocks.mqtt import MqttClock, default_client_id, event_id
from tests.contract.base import ClockContract, SourceDriver, require_service, wait_state
from tests.contract.proxy import TcpProxy


class MqttDriver(SourceDriver):
    clock_type = "mqtt"
    port = 1883

    def __init__(self) -> None:
        super().__init__()
        self.base = f"listener-cluster/{self.name}"
        self.topic = f"{self.base}/orders"  # where messages are published
        #: options a test adds to (or overrides in) the clock's options
        self.extra: dict[str, Any] = {}
        self.client: aiomqtt.Client | None = None

    async def setup(self) -> None:
        self.client = aiomqtt.Client(self.host, self.port, identifier=f"{self.name}-pub")
        await self.client.__aenter__()

    async def teardown(self) -> None:
        assert self.client is not None
        await self.client.__aexit__(None, None, None)
        # Wipe the clock's persistent session from the broker.
        client_id = self.extra.get("client_id", self.name)
        async with aiomqtt.Client(self.host, self.port, identifier=client_id, clean_session=True):
            pass

    def options(self, host: str, port: int) -> dict[str, Any]:
        # A fixed client id per test: every make_clock() of a test finds the same session.
        topic = f"{self.base}/+"
        return {"host": host, "port": port, "topic": topic, "client_id": self.name, **self.extra}

    async def publish_raw(self, payload: bytes, topic: str | None = None, qos: int = 1) -> None:
        assert self.client is not None
        await self.client.publish(topic or self.topic, payload, qos=qos)

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.publish_raw(json.dumps(payload).encode())

    async def publish_malformed(self) -> None:
        await self.publish_raw(b"{not json")


class TestMqttContract(ClockContract):
    redelivery_timeout = 10.0  # the broker resends unacked messages as the session reconnects

    @pytest.fixture
    def driver(self) -> MqttDriver:
        require_service("Mosquitto", "127.0.0.1", 1883)
        return MqttDriver()

    # -- MQTT specifics -----------------------------------------------------------------
    async def test_payload_id_gives_a_topic_scoped_event_id_and_metadata_is_in_the_payload(
        self, source: MqttDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish({"id": "evt-9", "n": 1})
        event = (await h.take(1)).events[0]
        assert event.id == f"{source.topic}:evt-9"
        assert event.type == "mqtt:message"
        assert event.payload == {
            "body": {"id": "evt-9", "n": 1},
            "topic": source.topic,
            "qos": 1,
            "retain": False,
        }

    async def test_payload_without_id_gets_a_hash_id_that_survives_redelivery(
        self, source: MqttDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish({"n": 1})
        first = (await h.take(1)).events[0]
        await h.stop()
        h2 = await make_clock()
        again = (await h2.take(1)).events[0]
        assert first.id.startswith("sha256:")
        assert again.id == first.id

    async def test_ack_for_a_lost_connection_is_skipped_and_the_messages_come_back_once(
        self, source: MqttDriver, make_clock: Any, proxy: TcpProxy
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        for i in range(2):
            await source.publish({"n": i})
        first = await h.take(2)
        proxy.cut()  # the connection dies between receive and ack
        await wait_state(h.clock, "degraded")
        proxy.restore()
        again = await h.take(2)
        assert {e.id for e in again.events} == {e.id for e in first.events}
        await h.ack_all()  # the stale batch is skipped, the redelivered one acked
        await h.stop()
        h2 = await make_clock()
        assert (await h2.quiet(1.0)).events == []

    async def test_qos_2_messages_are_delivered_once_acked(
        self, source: MqttDriver, make_clock: Any
    ) -> None:
        source.extra = {"qos": 2}
        h = await make_clock()
        await wait_state(h.clock, "listening")
        for i in range(3):
            await source.publish_raw(json.dumps({"n": i}).encode(), qos=2)
        got = await h.take(3)
        assert {e.payload["qos"] for e in got.events} == {2}
        await h.ack_all()
        await h.stop()
        h2 = await make_clock()
        assert (await h2.quiet(1.0)).events == []

    async def test_oversized_payload_is_rejected_as_too_large_and_acked(
        self, source: MqttDriver, make_clock: Any
    ) -> None:
        source.extra = {"max_bytes": 64}
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish({"pad": "x" * 100})
        got = await h.take(0, rejections=1)
        assert got.rejections[0].reason == "too_large"
        assert "max_bytes=64" in got.rejections[0].detail
        await h.ack_all()
        await h.stop()
        h2 = await make_clock()
        assert (await h2.quiet(1.0)).rejections == []

    async def test_messages_from_an_old_subscription_of_a_reused_client_id_are_dropped(
        self, source: MqttDriver, make_clock: Any
    ) -> None:
        h = await make_clock()  # subscribes <base>/+ in the session
        await wait_state(h.clock, "listening")
        await h.stop()
        source.extra = {"topic": f"{source.base}/+/new"}
        h2 = await make_clock()  # same client id, another filter: the old one lingers
        await wait_state(h2.clock, "listening")
        await source.publish({"n": 1})  # only the old subscription matches
        await source.publish_raw(b'{"n": 2}', topic=f"{source.base}/x/new")
        got = await h2.take(1)
        assert [e.payload["body"]["n"] for e in got.events] == [2]
        assert (await h2.quiet(0.5)).events == []

    async def test_missing_password_variable_degrades_naming_it(
        self, source: MqttDriver, make_clock: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("LC_TEST_MQTT_PASSWORD", raising=False)
        source.extra = {"username": "app", "password_env": "LC_TEST_MQTT_PASSWORD"}
        h = await make_clock()
        await wait_state(h.clock, "degraded")
        assert "LC_TEST_MQTT_PASSWORD" in h.clock.error


def test_default_client_id_is_stable_short_and_bound_to_the_topic() -> None:
    one = default_client_id("acme/ingest/sensors", "plant/+/temp")
    assert one == default_client_id("acme/ingest/sensors", "plant/+/temp")
    assert one != default_client_id("acme/ingest/sensors", "plant/#")
    assert len(one) <= 23


def test_clock_without_client_id_uses_the_derived_one() -> None:
    spec = ClockSpec("acme", "ingest", "sensors", "mqtt", {"topic": "plant/#"})
    clock = MqttClock(spec, CursorStore.for_clock(Path("/nonexistent"), spec))
    assert clock.client_id == default_client_id("acme/ingest/sensors", "plant/#")


def test_event_id_uses_the_payload_id_else_a_hash_of_topic_and_payload() -> None:
    assert event_id("a/b", b'{"id": 7}', {"id": 7}) == "a/b:7"
    hashed = event_id("a/b", b'{"n": 1}', {"n": 1})
    assert hashed.startswith("sha256:") and hashed != event_id("a/c", b'{"n": 1}', {"n": 1})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "topic"),
        ({"topic": "a/#/b"}, "topic"),
        ({"topic": "a/b+"}, "topic"),
        ({"topic": "a", "qos": 0}, "qos"),
        ({"topic": "a", "port": "1883"}, "port"),
        ({"topic": "a", "clean_session": "no"}, "clean_session"),
        ({"topic": "a", "password": "hunter2"}, "password"),
    ],
)
def test_bad_options_fail_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        MqttClock.check_options(options)
