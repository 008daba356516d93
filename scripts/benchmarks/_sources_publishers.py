"""Publishers for the ``sources`` benchmark: one per connector, talking to the real service.

Each :class:`Source` creates a fresh source (queue, stream, table, bucket, folder) named after
``name``, gives the clock options for it, publishes one timed message (latency) or ``n`` as fast
as the service takes them (throughput), reads the send time back out of an event's payload,
and deletes what it created.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

CHUNK = 500
HOST = "127.0.0.1"


def service_up(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def body(i: int, sent: float, tag: str) -> dict[str, Any]:
    return {"id": f"{tag}-{i}", "sent": sent}


async def in_chunks(n: int, one: Callable[[int], Awaitable[Any]], size: int = CHUNK) -> None:
    """``one(i)`` for i in range(n), ``size`` at a time concurrently."""
    for start in range(0, n, size):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + size))))


def threaded(n: int, one: Callable[[int], Any], threads: int = 16) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))


class Source:
    """One fresh source on one service."""

    type: ClassVar[str]
    port: ClassVar[int | None] = None  # checked before use; None: nothing to check

    def __init__(self, name: str, ctx: dict[str, Any]) -> None:
        self.name = name
        self.ctx = ctx  # shared: "root" (a temp folder), "moto" (endpoint), "ingress" (URL)
        self.flow = ""  # the flow this source feeds (set by the benchmark)

    @classmethod
    def unavailable(cls) -> str | None:
        if cls.port is not None and not service_up(cls.port):
            return f"service not reachable on {HOST}:{cls.port}"
        return None

    async def setup(self) -> None:
        """Create the source (before the cluster starts)."""

    async def teardown(self) -> None:
        """Delete it (after the cluster stopped)."""

    def options(self) -> dict[str, Any]:
        raise NotImplementedError

    async def publish(self, i: int, sent: float, tag: str) -> None:
        raise NotImplementedError

    async def publish_many(self, n: int, tag: str) -> None:
        await in_chunks(n, lambda i: self.publish(i, time.time(), tag))

    def sent_of(self, payload: dict[str, Any]) -> float:
        return float(payload["body"]["sent"])


class WebhookSource(Source):
    type = "webhook"

    def options(self) -> dict[str, Any]:
        return {}

    async def setup(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32))

    async def teardown(self) -> None:
        await self.client.aclose()

    async def publish(self, i: int, sent: float, tag: str) -> None:
        url = f"{self.ctx['ingress']}/v1/events/bench/{self.flow}"
        r = await self.client.post(url, json={"id": f"{tag}-{i}", "payload": {"sent": sent}})
        if r.status_code != 202:
            raise RuntimeError(f"ingress answered {r.status_code}: {r.text}")

    async def publish_many(self, n: int, tag: str) -> None:
        await in_chunks(n, lambda i: self.publish(i, time.time(), tag), size=32)

    def sent_of(self, payload: dict[str, Any]) -> float:
        return float(payload["sent"])


class DirectorySource(Source):
    type = "directory"

    def __init__(self, name: str, ctx: dict[str, Any]) -> None:
        super().__init__(name, ctx)
        self.path = Path(ctx["root"]) / "watched" / name

    async def setup(self) -> None:
        self.path.mkdir(parents=True)

    async def teardown(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def options(self) -> dict[str, Any]:
        return {"path": str(self.path), "pattern": "*.json", "poll_interval": 0.5}

    def _write(self, i: int, sent: float, tag: str) -> None:
        tmp = self.path / f".{tag}-{i}.tmp"  # dot names never match: no half-written file
        tmp.write_text(json.dumps(body(i, sent, tag)))
        os.replace(tmp, self.path / f"{tag}-{i}.json")

    async def publish(self, i: int, sent: float, tag: str) -> None:
        self._write(i, sent, tag)

    async def publish_many(self, n: int, tag: str) -> None:
        def write_all() -> None:
            for i in range(n):
                self._write(i, time.time(), tag)

        await asyncio.to_thread(write_all)

    def sent_of(self, payload: dict[str, Any]) -> float:
        return float(payload["content"]["sent"])


class _Aws(Source):
    @property
    def endpoint(self) -> str:
        return str(self.ctx["moto"])

    def client(self, service: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            config=Config(max_pool_connections=32),  # the publishers use 16 threads
        )


class S3Source(_Aws):
    """The put time is in the key (``<tag>/<sent>-<i>``): the S3 event has no body."""

    type = "s3"

    async def setup(self) -> None:
        self.s3 = self.client("s3")
        await asyncio.to_thread(self.s3.create_bucket, Bucket=self.name)

    async def teardown(self) -> None:
        def wipe() -> None:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.s3.delete_objects(Bucket=self.name, Delete={"Objects": keys})
            self.s3.delete_bucket(Bucket=self.name)

        await asyncio.to_thread(wipe)

    def options(self) -> dict[str, Any]:
        return {
            "bucket": self.name,
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "poll_interval": 0.05,
            "max_keys": 1000,
        }

    def _put(self, i: int, sent: float, tag: str) -> None:
        self.s3.put_object(Bucket=self.name, Key=f"{tag}/{sent:.6f}-{i}", Body=b"{}")

    async def publish(self, i: int, sent: float, tag: str) -> None:
        await asyncio.to_thread(self._put, i, sent, tag)

    async def publish_many(self, n: int, tag: str) -> None:
        await asyncio.to_thread(threaded, n, lambda i: self._put(i, time.time(), tag))

    def sent_of(self, payload: dict[str, Any]) -> float:
        return float(payload["key"].rsplit("/", 1)[1].split("-")[0])


class SqsSource(_Aws):
    type = "sqs"

    async def setup(self) -> None:
        self.sqs = self.client("sqs")
        made = await asyncio.to_thread(self.sqs.create_queue, QueueName=self.name)
        self.queue_url = made["QueueUrl"]

    async def teardown(self) -> None:
        await asyncio.to_thread(self.sqs.delete_queue, QueueUrl=self.queue_url)

    def options(self) -> dict[str, Any]:
        return {
            "queue_url": self.queue_url,
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "wait_time": 1,
            "max_batch": 100,  # the clock drains up to max_batch before delivering
        }

    async def publish(self, i: int, sent: float, tag: str) -> None:
        message = json.dumps(body(i, sent, tag))
        await asyncio.to_thread(self.sqs.send_message, QueueUrl=self.queue_url, MessageBody=message)

    async def publish_many(self, n: int, tag: str) -> None:
        def batch(start: int) -> None:
            entries = [
                {"Id": str(i), "MessageBody": json.dumps(body(i, time.time(), tag))}
                for i in range(start, min(n, start + 10))
            ]
            self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=entries)

        starts = list(range(0, n, 10))
        await asyncio.to_thread(threaded, len(starts), lambda k: batch(starts[k]), 8)


class S3SqsSource(S3Source):
    """A bucket notifying a queue; the put time is in the key as for ``s3``."""

    type = "s3-sqs"

    async def setup(self) -> None:
        await super().setup()
        self.sqs = self.client("sqs")
        made = await asyncio.to_thread(self.sqs.create_queue, QueueName=self.name)
        self.queue_url = made["QueueUrl"]
        attrs = await asyncio.to_thread(
            self.sqs.get_queue_attributes, QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )
        arn = attrs["Attributes"]["QueueArn"]
        config = {"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]}
        await asyncio.to_thread(
            self.s3.put_bucket_notification_configuration,
            Bucket=self.name,
            NotificationConfiguration=config,
        )

    async def teardown(self) -> None:
        await super().teardown()
        await asyncio.to_thread(self.sqs.delete_queue, QueueUrl=self.queue_url)

    def options(self) -> dict[str, Any]:
        return {
            "queue_name": self.name,
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "wait_time": 1,
            "max_batch": 100,  # the clock drains up to max_batch before delivering
        }


class RedisStreamSource(Source):
    type = "redis-stream"
    port = 6379

    async def setup(self) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis(host=HOST, port=6379)

    async def teardown(self) -> None:
        await self.redis.delete(self.name)
        await self.redis.aclose()

    def options(self) -> dict[str, Any]:
        url = f"redis://{HOST}:6379/0"
        return {"url": url, "stream": self.name, "block_ms": 100, "max_batch": 1000}

    async def publish(self, i: int, sent: float, tag: str) -> None:
        await self.redis.xadd(self.name, {"data": json.dumps(body(i, sent, tag))})

    async def publish_many(self, n: int, tag: str) -> None:
        for start in range(0, n, CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for i in range(start, min(n, start + CHUNK)):
                pipe.xadd(self.name, {"data": json.dumps(body(i, time.time(), tag))})
            await pipe.execute()


class NatsSource(Source):
    """The clock creates the stream (``create_stream``); it is deleted here."""

    type = "nats"
    port = 4222

    async def setup(self) -> None:
        import nats

        self.nc = await nats.connect(f"nats://{HOST}:4222")
        self.subject = f"{self.name}.events"

    async def teardown(self) -> None:
        import contextlib

        import nats.js.errors

        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.nc.jetstream().delete_stream(self.name)
        await self.nc.close()

    def options(self) -> dict[str, Any]:
        return {
            "servers": f"nats://{HOST}:4222",
            "stream": self.name,
            "subject": self.subject,
            "max_batch": 1000,
            "fetch_timeout": 0.1,
        }

    async def publish(self, i: int, sent: float, tag: str) -> None:
        await self.nc.jetstream().publish(self.subject, json.dumps(body(i, sent, tag)).encode())


class AmqpSource(Source):
    type = "amqp"
    port = 5672
    url = f"amqp://guest:guest@{HOST}:5672/"

    async def setup(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        await self.channel.declare_queue(self.name, durable=True)

    async def teardown(self) -> None:
        await self.channel.queue_delete(self.name)
        await self.connection.close()

    def options(self) -> dict[str, Any]:
        return {"url": self.url, "queue": self.name, "prefetch": 1000, "max_batch": 1000}

    async def publish(self, i: int, sent: float, tag: str) -> None:
        import aio_pika

        message = aio_pika.Message(
            json.dumps(body(i, sent, tag)).encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{tag}-{i}",
        )
        await self.channel.default_exchange.publish(message, routing_key=self.name)


class MqttSource(Source):
    """QoS 1 both ways; the clock's persistent session is wiped in teardown."""

    type = "mqtt"
    port = 1883

    async def setup(self) -> None:
        import aiomqtt

        self.topic = f"listener-cluster/{self.name}/events"
        self.client = aiomqtt.Client(HOST, 1883, identifier=f"{self.name}-pub")
        await self.client.__aenter__()

    async def teardown(self) -> None:
        import aiomqtt

        await self.client.__aexit__(None, None, None)
        async with aiomqtt.Client(HOST, 1883, identifier=self.name, clean_session=True):
            pass

    def options(self) -> dict[str, Any]:
        return {
            "host": HOST,
            "port": 1883,
            "topic": self.topic,
            "client_id": self.name,
            "qos": 1,
            "max_batch": 1000,
        }

    async def publish(self, i: int, sent: float, tag: str) -> None:
        await self.client.publish(self.topic, json.dumps(body(i, sent, tag)).encode(), qos=1)

    async def publish_many(self, n: int, tag: str) -> None:
        await in_chunks(n, lambda i: self.publish(i, time.time(), tag), size=100)


class PostgresSource(Source):
    """An outbox table ``(id bigserial, body text)``; every insert (or chunk) NOTIFYs."""

    type = "postgres"
    port = 5432
    dsn = f"postgresql://postgres@{HOST}:5432/postgres"

    def __init__(self, name: str, ctx: dict[str, Any]) -> None:
        super().__init__(name.replace("-", "_"), ctx)

    async def setup(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(self.dsn)
        await self.conn.execute(
            f"CREATE TABLE {self.name} (id bigserial PRIMARY KEY, body text NOT NULL)"
        )

    async def teardown(self) -> None:
        await self.conn.execute(f"DROP TABLE IF EXISTS {self.name}")
        await self.conn.close()

    def options(self) -> dict[str, Any]:
        return {
            "dsn": self.dsn,
            "table": self.name,
            "channel": self.name,
            "body_column": "body",
            "poll_interval": 0.2,
            "max_batch": 1000,
        }

    async def _insert(self, rows: Iterable[str]) -> None:
        await self.conn.executemany(
            f"INSERT INTO {self.name} (body) VALUES ($1)", [(r,) for r in rows]
        )
        await self.conn.execute(f"NOTIFY {self.name}")

    async def publish(self, i: int, sent: float, tag: str) -> None:
        await self._insert([json.dumps(body(i, sent, tag))])

    async def publish_many(self, n: int, tag: str) -> None:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            await self._insert(json.dumps(body(i, time.time(), tag)) for i in range(start, stop))


SOURCES: dict[str, type[Source]] = {
    cls.type: cls
    for cls in (
        DirectorySource,
        S3Source,
        SqsSource,
        S3SqsSource,
        RedisStreamSource,
        NatsSource,
        AmqpSource,
        MqttSource,
        PostgresSource,
        WebhookSource,
    )
}
