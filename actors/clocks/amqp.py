"""AMQP 0-9-1 clock (RabbitMQ): one event per message of a queue, acked only once durable.

The clock consumes with manual acks (``no_ack=False``) and a ``prefetch`` window. Deliveries
wait in a per-connection inbox; ``batches`` drains up to ``max_batch`` of them with a short
wait. ``ack`` acknowledges a batch on the channel that delivered it (one ``multiple=True`` ack
when the batch holds every outstanding delivery up to its highest tag). A delivery whose
channel is gone by ack time is not acked: the broker has already requeued it, redelivers it
with the same event id, and the ledger turns it into a duplicate.

Event id: the AMQP ``message_id`` property when the publisher set one, else a sha256 of
(queue, body, headers). An unreachable broker, a refused login or a missing queue make the
clock ``degraded`` (URL password masked) and it reconnects with capped backoff on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq import exceptions as errors
from yarl import URL

from actors.clocks import Batch, ClockSpec, CursorStore, EventClock, RawEvent, Rejection, register
from actors.clocks.base import Backoff, decode_json_object, mask_url
from actors.event import MAX_PAYLOAD_BYTES, iso, utcnow_iso

__all__ = ["AmqpClock", "ack_plan", "event_id", "mask_url", "parse_body"]

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
# OSError covers ConnectionError and TimeoutError
SOURCE_ERRORS = (errors.AMQPError, errors.ChannelInvalidStateError, OSError)


def parse_body(raw: bytes, max_bytes: int) -> tuple[dict[str, Any] | None, str, str]:
    """(body, "", "") for a JSON object up to ``max_bytes``, else ``(None, reason, detail)``."""
    decoded = decode_json_object(raw, max_bytes, "message body")
    if isinstance(decoded, dict):
        return decoded, "", ""
    return None, *decoded


def jsonable(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, decimals, nested tables) as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return float(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def event_id(queue: str, message_id: str | None, body: bytes, headers: dict[str, Any]) -> str:
    """The publisher's ``message_id``, else ``sha256:`` of (queue, body, headers)."""
    if message_id:
        return message_id
    digest = hashlib.sha256()
    canonical = json.dumps(headers, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for part in (queue.encode(), body, canonical.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def ack_plan(outstanding: Iterable[int], tags: Iterable[int]) -> list[tuple[int, bool]]:
    """``(delivery_tag, multiple)`` acks that settle exactly ``tags`` on a channel.

    One ``multiple=True`` ack at the highest tag when every outstanding delivery up to it is in
    ``tags`` (the usual case: batches are acked in order); one ack per tag otherwise, so an ack
    never settles a delivery of another, not yet durable batch.
    """
    wanted = sorted(set(tags))
    if not wanted:
        return []
    top = wanted[-1]
    if {t for t in outstanding if t <= top} <= set(wanted):
        return [(top, True)]
    return [(t, False) for t in wanted]


@dataclass(slots=True)
class _Lost:
    """Put into a link's inbox when its connection, channel or consumer goes away."""

    reason: str


@dataclass(eq=False)
class _Link:
    """One connection + channel + consumer, and the deliveries it has not acked yet."""

    connection: AbstractConnection
    channel: AbstractChannel
    inbox: asyncio.Queue[AbstractIncomingMessage | _Lost] = field(default_factory=asyncio.Queue)
    outstanding: set[int] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed


@dataclass(slots=True)
class _AckToken:
    link: _Link
    tags: list[int]


@register
class AmqpClock(EventClock):
    """Emits an ``amqp:message`` event per message of ``queue``.

    Options: ``url`` (default ``amqp://guest:guest@127.0.0.1:5672/``), ``url_env`` (name of an
    environment variable holding the URL, wins over ``url``), ``queue`` (required), ``declare``
    (default true: declare a durable queue), ``exchange`` / ``routing_key`` (bind the queue),
    ``prefetch`` (default 100), ``max_batch`` (default 100), ``batch_wait_ms`` (default 5),
    ``max_bytes`` (default 1 MiB).
    """

    type = "amqp"
    options: ClassVar[frozenset[str]] = frozenset(
        {"url", "url_env", "queue", "declare", "exchange", "routing_key", "prefetch"}
        | {"max_batch", "batch_wait_ms", "max_bytes"}
    )
    #: longest wait between reconnect attempts while degraded
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        env = opts.get("url_env")
        self.url: str = (os.environ.get(env) if env else None) or opts.get("url") or DEFAULT_URL
        if not self.url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"${env} must hold an amqp:// or amqps:// URL, got {mask_url(self.url)!r}"
            )
        self.queue: str = opts["queue"]
        self.declare: bool = opts.get("declare", True)
        self.exchange: str | None = opts.get("exchange")
        self.routing_key: str | None = opts.get("routing_key")
        self.prefetch: int = opts.get("prefetch", 100)
        self.max_batch: int = opts.get("max_batch", 100)
        self.batch_wait: float = opts.get("batch_wait_ms", 5) / 1000
        self.max_bytes: int = opts.get("max_bytes", MAX_PAYLOAD_BYTES)
        self._link: _Link | None = None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        queue = options.get("queue")
        if not isinstance(queue, str) or not queue:
            raise ValueError("an amqp clock needs option 'queue' (a queue name)")
        url = options.get("url", DEFAULT_URL)
        if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"option 'url' must be an amqp:// or amqps:// URL, got {mask_url(url)!r}"
            )
        for key in ("url_env", "exchange", "routing_key"):
            if options.get(key) is not None and not isinstance(options[key], str):
                raise ValueError(f"option {key!r} must be a string, got {options[key]!r}")
        if options.get("routing_key") is not None and not options.get("exchange"):
            raise ValueError("option 'routing_key' needs option 'exchange' (the exchange to bind)")
        if not isinstance(options.get("declare", True), bool):
            raise ValueError(f"option 'declare' must be true or false, got {options['declare']!r}")
        for key, low, high, default in (
            ("prefetch", 1, 65535, 100),
            ("max_batch", 1, 10000, 100),
            ("batch_wait_ms", 0, 10000, 5),
            ("max_bytes", 1, 2**31, MAX_PAYLOAD_BYTES),
        ):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"option {key!r} must be an integer from {low} to {high}, got {value!r}"
                )

    @property
    def source(self) -> str:
        return str(URL(self.url).with_user(None).with_fragment(self.queue))

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await _close_link(link)

    async def ack(self, batch: Batch) -> None:
        token = batch.token
        if not isinstance(token, _AckToken) or not token.tags:
            return
        link = token.link
        if link is not self._link or not link.alive:
            log.info(
                "amqp clock %s: the channel that delivered %d messages is gone; the broker "
                "redelivers them and the ledger drops the duplicates",
                self.spec.key,
                len(token.tags),
            )
            return
        try:
            channel = await link.channel.get_underlay_channel()
            for tag, multiple in ack_plan(link.outstanding, token.tags):
                await channel.basic_ack(tag, multiple=multiple)
        except SOURCE_ERRORS as exc:
            log.info("amqp clock %s: ack failed (%s); the broker redelivers", self.spec.key, exc)
            return
        link.outstanding.difference_update(token.tags)

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=0.5, cap=self.max_backoff)
        while True:
            try:
                self._link = await self._connect()
            except SOURCE_ERRORS as exc:
                self._degrade(self._describe(exc))
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            lost = None
            async for batch in self._consume(self._link):
                if isinstance(batch, _Lost):
                    lost = batch  # the last item: _consume stops after it
                else:
                    yield batch
            self._degrade(lost.reason if lost else f"connection to {mask_url(self.url)} lost")
            link, self._link = self._link, None
            await _close_link(link)
            await asyncio.sleep(backoff.next())

    def _degrade(self, reason: str) -> None:
        if self.state != "degraded":
            log.warning("amqp clock %s degraded: %s", self.spec.key, reason)
        self.set_degraded(reason)

    async def _connect(self) -> _Link:
        connection = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.declare_queue(
                self.queue, durable=True, passive=not self.declare, timeout=CONNECT_TIMEOUT
            )
            if self.exchange:
                await queue.bind(self.exchange, routing_key=self.routing_key)
            link = _Link(connection, channel)
            await self._watch(link)
            await queue.consume(self._receiver(link), no_ack=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
            raise
        return link

    async def _watch(self, link: _Link) -> None:
        """Make the loss of the connection, the channel or the consumer wake ``_consume``."""
        where = mask_url(self.url)

        def closed(_sender: Any, exc: BaseException | None = None) -> None:
            detail = f": {self._scrub(str(exc))}" if exc else ""
            link.inbox.put_nowait(_Lost(f"connection to {where} lost{detail}"))

        def cancelled(_frame: Any) -> None:
            link.inbox.put_nowait(_Lost(f"the broker cancelled the consumer of {self.queue!r}"))

        link.connection.close_callbacks.add(closed)
        link.channel.close_callbacks.add(closed)
        underlay = await link.channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(cancelled)

    @staticmethod
    def _receiver(link: _Link) -> Any:
        async def on_message(message: AbstractIncomingMessage) -> None:
            if message.delivery_tag is not None:
                link.outstanding.add(message.delivery_tag)
            link.inbox.put_nowait(message)

        return on_message

    async def _consume(self, link: _Link) -> AsyncIterator[Batch | _Lost]:
        """Batches from ``link`` until it is lost (then yields the ``_Lost`` and stops)."""
        loop = asyncio.get_running_loop()
        while True:
            first = await link.inbox.get()
            if isinstance(first, _Lost):
                yield first
                return
            messages, lost = [first], None
            deadline = loop.time() + self.batch_wait
            while len(messages) < self.max_batch:
                try:
                    item = link.inbox.get_nowait()
                except asyncio.QueueEmpty:
                    try:  # safe: a cancelled Queue.get leaves its item in the queue
                        item = await asyncio.wait_for(link.inbox.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                if isinstance(item, _Lost):
                    lost = item
                    break
                messages.append(item)
            yield self._batch(link, messages)
            if lost is not None:
                yield lost
                return

    def _batch(self, link: _Link, messages: list[AbstractIncomingMessage]) -> Batch:
        batch = Batch(token=_AckToken(link, [m.delivery_tag for m in messages if m.delivery_tag]))
        for message in messages:
            item = self._convert(message)
            if isinstance(item, RawEvent):
                batch.events.append(item)
            else:
                batch.rejections.append(item)
        return batch

    def _convert(self, message: AbstractIncomingMessage) -> RawEvent | Rejection:
        headers = jsonable(dict(message.headers or {}))
        eid = event_id(self.queue, message.message_id, message.body, headers)
        body, reason, detail = parse_body(message.body, self.max_bytes)
        if body is None:
            return Rejection(reason=reason, detail=f"{detail} (queue {self.queue!r})", ref=eid)
        return RawEvent(
            id=eid,
            type="amqp:message",
            occurred=iso(message.timestamp) if message.timestamp else utcnow_iso(),
            payload={
                "body": body,
                "message_id": message.message_id,
                "routing_key": message.routing_key,
                "exchange": message.exchange,
                "headers": headers,
                "redelivered": bool(message.redelivered),
            },
        )

    def _scrub(self, text: str) -> str:
        password = URL(self.url).password
        return text.replace(password, "***") if password else text

    def _describe(self, exc: BaseException) -> str:
        """A human reason for ``degraded`` (the URL's password masked)."""
        where, text = mask_url(self.url), self._scrub(str(exc) or type(exc).__name__)
        if isinstance(exc, (errors.AuthenticationError, errors.ProbableAuthenticationError)):
            return f"login to {where} refused: check the user and password ({text})"
        if isinstance(exc, errors.ChannelNotFoundEntity):
            return f"not found at {where}: {text}"
        if isinstance(exc, errors.ChannelPreconditionFailed):
            return (
                f"queue {self.queue!r} exists at {where} with other settings ({text}); "
                "set declare: false to consume it as it is"
            )
        if isinstance(exc, errors.ChannelAccessRefused):
            return f"access refused at {where}: {text}"
        if isinstance(exc, TimeoutError):
            return f"timed out connecting to {where}"
        if isinstance(exc, (ConnectionError, OSError)):
            return f"cannot reach the AMQP broker at {where}: {text}"
        return f"AMQP error at {where}: {type(exc).__name__}: {text}"


async def _close_link(link: _Link) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(link.connection.close(), CLOSE_TIMEOUT)
