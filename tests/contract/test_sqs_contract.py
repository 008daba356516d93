"""The clock contract for ``sqs`` and ``s3-sqs`` against moto's real HTTP server, plus what is
particular to SQS: visibility extension of a slow batch, redelivery after the visibility
timeout, S3 notification decoding (moto delivers S3 → SQS notifications in server mode, so
``s3-sqs`` is fed by real ``PutObject`` calls on a bucket whose notifications target the queue).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlparse

import boto3
import pytest

from actors.clocks import CLOCK_TYPES, ClockSpec, CursorStore, RawEvent, Rejection
from actors.clocks.sqs import S3SqsClock, SqsClock, mask_url
from actors.clocks.sqs_messages import decode_message, decode_s3_notification
from tests.contract.base import ClockContract, Harness, SourceDriver, require_service, wait_state

VISIBILITY = 2  # seconds: redelivery of unacked messages stays fast


class SqsDriver(SourceDriver):
    clock_type = "sqs"

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        url = urlparse(endpoint)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.queue_url = ""
        self.visibility_timeout = VISIBILITY

    async def setup(self) -> None:
        created = await asyncio.to_thread(self.sqs.create_queue, QueueName=self.name)
        self.queue_url = created["QueueUrl"]

    async def teardown(self) -> None:
        await asyncio.to_thread(self.sqs.delete_queue, QueueUrl=self.queue_url)

    def options(self, host: str, port: int) -> dict[str, Any]:
        path = urlparse(self.queue_url).path
        return {
            "queue_url": f"http://{host}:{port}{path}",
            "endpoint_url": f"http://{host}:{port}",
            "region": "us-east-1",
            "wait_time": 1,
            "visibility_timeout": self.visibility_timeout,
        }

    async def send(self, body: str) -> str:
        sent = await asyncio.to_thread(
            self.sqs.send_message, QueueUrl=self.queue_url, MessageBody=body
        )
        return sent["MessageId"]

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.send(json.dumps(payload))

    async def receive_for(self, seconds: int) -> list[dict[str, Any]]:
        """What another consumer receives within ``seconds`` (it hides nothing it gets)."""
        got = await asyncio.to_thread(
            self.sqs.receive_message,
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=seconds,
            VisibilityTimeout=0,
        )
        return got.get("Messages", [])

    async def queue_counts(self) -> dict[str, int]:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        got = await asyncio.to_thread(
            self.sqs.get_queue_attributes, QueueUrl=self.queue_url, AttributeNames=names
        )
        visible, in_flight = (int(got["Attributes"][n]) for n in names)
        return {"visible": visible, "in_flight": in_flight}

    async def publish_malformed(self) -> None:
        await self.send("{this is not json")


class S3SqsDriver(SqsDriver):
    """A bucket whose ``ObjectCreated`` notifications go to the queue; publish = put an object."""

    clock_type = "s3-sqs"

    async def setup(self) -> None:
        await super().setup()
        attrs = await asyncio.to_thread(
            self.sqs.get_queue_attributes, QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )
        await asyncio.to_thread(self.s3.create_bucket, Bucket=self.name)
        config = {
            "QueueConfigurations": [
                {
                    "QueueArn": attrs["Attributes"]["QueueArn"],
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                }
            ]
        }
        await asyncio.to_thread(
            self.s3.put_bucket_notification_configuration,
            Bucket=self.name,
            NotificationConfiguration=config,
        )  # S3 (and moto) now sends an s3:TestEvent message, which the clock must ignore

    def options(self, host: str, port: int) -> dict[str, Any]:
        opts = super().options(host, port)
        del opts["queue_url"]
        return {**opts, "queue_name": self.name}  # resolved through GetQueueUrl

    async def put(self, key: str, body: bytes = b"{}") -> str:
        put = await asyncio.to_thread(self.s3.put_object, Bucket=self.name, Key=key, Body=body)
        return put["ETag"].strip('"')

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.put(f"obj-{payload['n']}.json")

    def payload_of(self, event_payload: Any) -> dict[str, Any]:
        return {"n": int(event_payload["key"].removeprefix("obj-").removesuffix(".json"))}


def _moto_driver(cls: type[SqsDriver], endpoint: str) -> SqsDriver:
    url = urlparse(endpoint)
    require_service("moto server", url.hostname or "127.0.0.1", url.port or 80)
    return cls(endpoint)


class TestSqsContract(ClockContract):
    redelivery_timeout = 15.0

    @pytest.fixture
    def driver(self, moto_endpoint: str) -> SqsDriver:
        return _moto_driver(SqsDriver, moto_endpoint)

    async def test_event_carries_the_message_id_body_and_receive_count(
        self, source: SqsDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        try:
            message_id = await source.send(json.dumps({"order": 7}))
            got = await h.take(1)
            event = got.events[0]
            assert event.id == message_id
            assert event.type == "sqs:Message"
            assert event.payload["body"] == {"order": 7}
            assert event.payload["message_id"] == message_id
            assert event.payload["receive_count"] == 1
            assert "SentTimestamp" in event.payload["attributes"]
        finally:
            await h.stop()

    async def test_a_slow_batch_is_not_redelivered_while_it_waits_for_its_ack(
        self, source: SqsDriver, make_clock: Any
    ) -> None:
        source.visibility_timeout = 1
        h = await make_clock()
        try:
            await source.publish({"n": 1})
            await source.publish({"n": 2})
            await h.take(2)
            # The push takes three visibility timeouts; a rival consumer polls all along.
            rival = await source.receive_for(seconds=3 * source.visibility_timeout + 1)
            assert rival == []
            assert (await h.quiet(0.5)).events == []
            await h.ack_all()
            assert await source.queue_counts() == {"visible": 0, "in_flight": 0}
        finally:
            await h.stop()

    async def test_unacked_messages_come_back_after_the_visibility_timeout_with_the_same_ids(
        self, source: SqsDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        for i in range(3):
            await source.publish({"n": i})
        first = await h.take(3)
        await h.stop()  # stops the visibility extension; nothing was deleted
        h2 = await make_clock()
        try:
            again = await h2.take(3, timeout=self.redelivery_timeout)
            assert {e.id for e in again.events} == {e.id for e in first.events}
            assert all(e.payload["receive_count"] >= 2 for e in again.events)  # received again
        finally:
            await h2.stop()

    async def test_a_missing_queue_degrades_the_clock_with_a_clear_reason(
        self, source: SqsDriver, tmp_path: Path
    ) -> None:
        options = {**source.options(source.host, source.port), "wait_time": 0}
        options["queue_url"] = options["queue_url"] + "-missing"
        spec = ClockSpec("t", "f", "missing", "sqs", options)
        h = await Harness(SqsClock(spec, CursorStore.for_clock(tmp_path, spec))).start()
        try:
            await wait_state(h.clock, "degraded")
            assert "does not exist" in (h.clock.error or "")
        finally:
            await h.stop()


class TestS3SqsContract(ClockContract):
    redelivery_timeout = 15.0

    @pytest.fixture
    def driver(self, moto_endpoint: str) -> S3SqsDriver:
        return _moto_driver(S3SqsDriver, moto_endpoint)

    async def test_the_event_id_agrees_with_the_s3_polling_clock(
        self, source: S3SqsDriver, make_clock: Any, tmp_path: Path
    ) -> None:
        h = await make_clock()
        etag = await source.put("in/a b+c.json", b'{"x": 1}')
        got = await h.take(1)
        event = got.events[0]
        endpoint = f"http://{source.host}:{source.port}"
        options = {"bucket": source.name, "endpoint_url": endpoint, "poll_interval": 0.1}
        spec = ClockSpec("t", "f", "poll", "s3", options)
        poller = await Harness(
            CLOCK_TYPES["s3"](spec, CursorStore.for_clock(tmp_path, spec))
        ).start()
        try:
            polled = await poller.take(1)
            assert event.id == polled.events[0].id == f"{source.name}/in/a b+c.json@{etag}"
            assert event.type == "s3:ObjectCreated"
            assert event.payload["key"] == "in/a b+c.json"
            assert event.payload["size"] == 8
            assert event.payload["event_name"].startswith("ObjectCreated:")
        finally:
            await poller.stop()
            await h.stop()

    async def test_test_events_and_removals_are_acked_without_events(
        self, source: S3SqsDriver, make_clock: Any
    ) -> None:
        await source.put("gone.json")
        await asyncio.to_thread(source.s3.delete_object, Bucket=source.name, Key="gone.json")
        await source.put("kept.json")
        h = await make_clock()
        got = await h.take(2)
        assert sorted(e.payload["key"] for e in got.events) == ["gone.json", "kept.json"]
        assert (await h.quiet(1.0)).events == []
        await h.ack_all()
        await h.stop()
        assert await source.queue_counts() == {"visible": 0, "in_flight": 0}

    async def test_prefix_and_suffix_filter_the_keys(
        self, source: S3SqsDriver, proxy: Any, tmp_path: Path
    ) -> None:
        options = {**source.options("127.0.0.1", proxy.port), "prefix": "in/", "suffix": ".csv"}
        spec = ClockSpec("t", "f", "filtered", "s3-sqs", options)
        h = await Harness(S3SqsClock(spec, CursorStore.for_clock(tmp_path, spec))).start()
        try:
            for key in ("in/a.json", "out/b.csv", "in/c.csv"):
                await source.put(key)
            got = await h.take(1)
            assert [e.payload["key"] for e in got.events] == ["in/c.csv"]
            assert (await h.quiet(1.0)).events == []
        finally:
            await h.stop()


# -- decoding and options, without a queue ------------------------------------------------
def _message(body: str, mid: str = "m-1") -> dict[str, Any]:
    attrs = {"SentTimestamp": "1700000000000", "ApproximateReceiveCount": "3"}
    return {"MessageId": mid, "ReceiptHandle": "rh", "Body": body, "Attributes": attrs}


def _record(key: str, event: str = "ObjectCreated:Put", **obj: Any) -> dict[str, Any]:
    return {
        "eventName": event,
        "eventTime": "2024-05-01T10:00:00.000Z",
        "s3": {"bucket": {"name": "landing"}, "object": {"key": quote_plus(key), **obj}},
    }


def test_a_queue_message_becomes_one_event_keyed_by_its_message_id() -> None:
    [event] = decode_message(_message('{"a": 1}'))
    assert isinstance(event, RawEvent)
    assert (event.id, event.payload["body"], event.payload["receive_count"]) == ("m-1", {"a": 1}, 3)
    assert event.occurred.startswith("2023-11-14T22:13:20")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "malformed"),
        ("[1, 2]", "malformed"),
        ('{"big": "' + "x" * 64 + '"}', "too_large"),
    ],
)
def test_bad_bodies_become_rejections_naming_the_message(body: str, reason: str) -> None:
    [rejection] = decode_message(_message(body), max_bytes=32)
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.ref) == (reason, "m-1")
    assert rejection.detail


def test_s3_records_decode_url_encoded_keys_and_fall_back_to_the_version_id() -> None:
    records = [
        _record("a b/c+d.json", size=5, eTag="e1"),
        _record("v.json", size=1, versionId="v7"),
        _record("x.json", event="ObjectRemoved:Delete", eTag="e2"),
    ]
    events = decode_s3_notification(_message(json.dumps({"Records": records})))
    assert [e.id for e in events] == ["landing/a b/c+d.json@e1", "landing/v.json@v7"]
    assert events[0].payload == {
        "bucket": "landing",
        "key": "a b/c+d.json",
        "etag": "e1",
        "size": 5,
        "version_id": None,
        "event_name": "ObjectCreated:Put",
        "event_time": "2024-05-01T10:00:00.000Z",
    }
    assert events[0].occurred == "2024-05-01T10:00:00+00:00"


def test_s3_test_events_are_ignored_and_sns_envelopes_unwrapped() -> None:
    assert decode_s3_notification(_message('{"Event": "s3:TestEvent", "Bucket": "b"}')) == []
    inner = json.dumps({"Records": [_record("k.json", eTag="e")]})
    wrapped = json.dumps({"Type": "Notification", "Message": inner})
    assert [e.id for e in decode_s3_notification(_message(wrapped))] == ["landing/k.json@e"]


@pytest.mark.parametrize(
    "body", ["nope", '{"hello": 1}', '{"Records": [{"eventName": "ObjectCreated:Put"}]}']
)
def test_a_body_that_is_no_s3_notification_is_rejected_as_malformed(body: str) -> None:
    [rejection] = decode_s3_notification(_message(body))
    assert isinstance(rejection, Rejection) and rejection.reason == "malformed"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "queue_url"),
        ({"queue_name": "q", "wait_time": 30}, "wait_time"),
        ({"queue_name": "q", "visibility_timeout": 0}, "visibility_timeout"),
        ({"queue_name": "q", "endpoint_url": "localhost:4566"}, "endpoint_url"),
        ({"queue_name": "q", "bucket": "b"}, "bucket"),
    ],
)
def test_bad_options_fail_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SqsClock.check_options(options)


def test_s3_sqs_accepts_key_filters_and_urls_are_printed_without_passwords() -> None:
    S3SqsClock.check_options({"queue_name": "q", "prefix": "in/", "suffix": ".csv"})
    assert mask_url("http://user:secret@host:4566/q") == "http://user:***@host:4566/q"
