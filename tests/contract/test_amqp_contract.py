"""The clock contract for ``amqp`` against the real RabbitMQ on loopback, plus AMQP specifics:
content-hash ids, acks skipped for a lost channel, masked credentials, bindings, limits."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from actors.clocks.amqp import AmqpClock, ack_plan, mask_url
from tests.contract.base import ClockContract, SourceDriver, require_service, wait_state
from tests.contract.proxy import TcpProxy


class AmqpDriver(SourceDriver):
    clock_type = "amqp"
    port = 5672

    def __init__(self) -> None:
        super().__init__()
        #: options a test adds to (or overrides in) the clock's options
        self.extra: dict[str, Any] = {}
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def setup(self) -> None:
        self.connection = await aio_pika.connect(f"amqp://guest:guest@{self.host}:{self.port}/")
        self.channel = await self.connection.channel()
        await self.channel.declare_queue(self.name, durable=True)

    async def teardown(self) -> None:
        assert self.connection is not None and self.channel is not None
        await self.channel.queue_delete(self.name)
        await self.connection.close()

    def options(self, host: str, port: int) -> dict[str, Any]:
        url = f"amqp://guest:guest@{host}:{port}/"
        return {"url": url, "queue": self.name, **self.extra}

    async def publish_raw(self, body: bytes, routing_key: str | None = None, **props: Any) -> None:
        assert self.channel is not None
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props)
        await self.channel.default_exchange.publish(message, routing_key=routing_key or self.name)

    async def publish_without_message_id(self, body: bytes) -> None:
        """Publish as pika or the Java client do by default: no ``message_id`` property
        (aio-pika/aiormq always invent one, so the frames are written by hand)."""
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        frames = [
            spec.Basic.Publish(exchange="", routing_key=self.name),
            ContentHeader(properties=spec.Basic.Properties(delivery_mode=2), body_size=len(body)),
            ContentBody(body),
        ]
        await underlay.write_queue.put(ChannelFrame.marshall(underlay.number, frames))
        await channel.close()  # after the publish on the same connection: the broker has it

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.publish_raw(json.dumps(payload).encode(), message_id=uuid.uuid4().hex)

    async def publish_malformed(self) -> None:
        await self.publish_raw(b"{not json", message_id=uuid.uuid4().hex)


class TestAmqpContract(ClockContract):
    redelivery_timeout = 10.0  # closing the connection requeues at once

    @pytest.fixture
    def driver(self) -> AmqpDriver:
        require_service("RabbitMQ", "127.0.0.1", 5672)
        return AmqpDriver()

    # -- AMQP specifics -----------------------------------------------------------------
    async def test_publisher_message_id_is_the_event_id_and_metadata_is_in_the_payload(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish_raw(b'{"n": 1}', message_id="order-17", headers={"tenant": "acme"})
        got = await h.take(1)
        event = got.events[0]
        assert event.id == "order-17"
        assert event.type == "amqp:message"
        assert event.payload == {
            "body": {"n": 1},
            "message_id": "order-17",
            "routing_key": source.name,
            "exchange": "",
            "headers": {"tenant": "acme"},
            "redelivered": False,
        }

    async def test_message_without_id_gets_a_content_hash_id_that_survives_redelivery(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish_without_message_id(b'{"n": 1}')
        first = (await h.take(1)).events[0]
        await h.stop()
        h2 = await make_clock()
        again = (await h2.take(1)).events[0]
        assert first.id.startswith("sha256:")
        assert again.id == first.id
        assert (first.payload["redelivered"], again.payload["redelivered"]) == (False, True)

    async def test_batch_whose_channel_was_lost_is_not_acked_and_comes_back_once(
        self, source: AmqpDriver, make_clock: Any, proxy: TcpProxy
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        for i in range(2):
            await source.publish({"n": i})
        first = await h.take(2)
        proxy.cut()  # the channel dies between receive and ack
        await wait_state(h.clock, "degraded")
        proxy.restore()
        again = await h.take(2)
        assert {e.id for e in again.events} == {e.id for e in first.events}
        assert all(e.payload["redelivered"] for e in again.events)
        await h.ack_all()  # the stale batch is skipped, the redelivered one acked
        await h.stop()
        h2 = await make_clock()
        assert (await h2.quiet(1.0)).events == []

    async def test_oversized_message_is_rejected_as_too_large_and_acked(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        source.extra = {"max_bytes": 64}
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish_raw(json.dumps({"pad": "x" * 100}).encode(), message_id="big-1")
        got = await h.take(0, rejections=1)
        assert (got.rejections[0].reason, got.rejections[0].ref) == ("too_large", "big-1")
        assert "max_bytes=64" in got.rejections[0].detail
        await h.ack_all()
        await h.stop()
        h2 = await make_clock()
        assert (await h2.quiet(1.0)).rejections == []

    async def test_json_that_is_not_an_object_is_malformed(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish_raw(b"[1, 2]", message_id="list-1")
        got = await h.take(0, rejections=1)
        assert got.rejections[0].reason == "malformed"
        assert "JSON object" in got.rejections[0].detail

    async def test_queue_bound_to_an_exchange_receives_its_routed_messages(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        key = f"{source.name}.created"
        source.extra = {"exchange": "amq.topic", "routing_key": f"{source.name}.*"}
        h = await make_clock()
        await wait_state(h.clock, "listening")
        assert source.channel is not None
        exchange = await source.channel.get_exchange("amq.topic")
        await exchange.publish(aio_pika.Message(b'{"n": 7}', message_id="m-7"), routing_key=key)
        event = (await h.take(1)).events[0]
        assert (event.payload["exchange"], event.payload["routing_key"]) == ("amq.topic", key)

    async def test_refused_login_degrades_with_the_password_masked(
        self, source: AmqpDriver, make_clock: Any, proxy: TcpProxy
    ) -> None:
        source.extra = {"url": f"amqp://guest:s3cret-pw@127.0.0.1:{proxy.port}/"}
        h = await make_clock()
        await wait_state(h.clock, "degraded")
        assert "login" in h.clock.error and "refused" in h.clock.error
        assert "s3cret-pw" not in h.clock.error and "guest:***@" in h.clock.error

    async def test_missing_queue_without_declare_degrades_naming_the_queue(
        self, source: AmqpDriver, make_clock: Any
    ) -> None:
        source.extra = {"queue": f"{source.name}-missing", "declare": False}
        h = await make_clock()
        await wait_state(h.clock, "degraded")
        assert f"{source.name}-missing" in h.clock.error


def test_ack_plan_acks_a_whole_in_order_batch_with_one_multiple_ack() -> None:
    assert ack_plan(outstanding={1, 2, 3, 4}, tags=[1, 2, 3]) == [(3, True)]


def test_ack_plan_acks_one_by_one_when_an_earlier_delivery_is_still_pending() -> None:
    assert ack_plan(outstanding={1, 2, 3, 4}, tags=[2, 3]) == [(2, False), (3, False)]


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("amqp://app:hunter2@mq:5672/prod") == "amqp://app:***@mq:5672/prod"
    assert mask_url("amqp://mq:5672/") == "amqp://mq:5672/"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "queue"),
        ({"queue": "q", "qeueu": "x"}, "qeueu"),
        ({"queue": "q", "url": "http://mq/"}, "url"),
        ({"queue": "q", "prefetch": 0}, "prefetch"),
        ({"queue": "q", "declare": "yes"}, "declare"),
        ({"queue": "q", "routing_key": "a.b"}, "exchange"),
    ],
)
def test_bad_options_fail_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        AmqpClock.check_options(options)


def test_a_bad_url_is_reported_with_its_password_masked() -> None:
    with pytest.raises(ValueError) as info:
        AmqpClock.check_options({"queue": "q", "url": "http://u:topsecret@mq/"})
    assert "topsecret" not in str(info.value)
