"""MQTT clock: one event per message on a topic filter, acknowledged only once durable.

The clock connects with a stable client id and ``clean_session: false``, so the broker keeps a
persistent session (the subscription and every QoS 1/2 message not yet acknowledged) while the
clock is away. paho-mqtt's manual acks are on: a QoS 1 message gets its PUBACK (QoS 2: its
PUBCOMP) in ``ack``, never on receipt, so a message received but not acked before a crash is
sent again by the broker when the same session reconnects. MQTT packet ids live only as long
as a connection: an ack for a connection that is gone is skipped (the broker redelivers).

Event id: ``<topic>:<id>`` when the payload is a JSON object with an ``id``, else a sha256 of
(topic, payload). An unreachable broker, a refused login or a refused subscription make the
clock ``degraded``; it reconnects with capped backoff on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import aiomqtt
import paho.mqtt.client as paho

from actors.clocks import Batch, ClockSpec, CursorStore, EventClock, RawEvent, Rejection, register
from actors.clocks.base import Backoff, decode_json_object
from actors.event import MAX_PAYLOAD_BYTES, utcnow_iso

__all__ = ["MqttClock", "default_client_id", "event_id", "parse_body"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
KEEPALIVE = 30
SOURCE_ERRORS = (aiomqtt.MqttError, OSError)  # OSError covers ConnectionError, TimeoutError


class SubscriptionRefused(aiomqtt.MqttError):
    """The broker answered SUBACK with a failure code (usually an ACL)."""


def default_client_id(key: str, topic: str) -> str:
    """A client id that is stable for one clock and one topic filter (23 chars, MQTT 3.1 safe).

    Stable, so a restarted clock finds its persistent session again; bound to the topic, so a
    changed filter starts a fresh session instead of inheriting the old subscription.
    """
    return "lc-" + hashlib.sha256(f"{key}|{topic}".encode()).hexdigest()[:20]


def parse_body(raw: bytes, max_bytes: int) -> tuple[dict[str, Any] | None, str, str]:
    """(body, "", "") for a JSON object up to ``max_bytes``, else ``(None, reason, detail)``."""
    decoded = decode_json_object(raw, max_bytes, "payload")
    if isinstance(decoded, dict):
        return decoded, "", ""
    return None, *decoded


def event_id(topic: str, payload: bytes, body: dict[str, Any] | None) -> str:
    """``<topic>:<id>`` for a body carrying an ``id``, else ``sha256:`` of (topic, payload)."""
    given = (body or {}).get("id")
    if isinstance(given, (str, int)) and not isinstance(given, bool) and given != "":
        return f"{topic}:{given}"
    digest = hashlib.sha256()
    for part in (topic.encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT subscription filter, or None when it is."""
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` is covered by ``topic_filter`` (a ``$share/<group>/`` prefix ignored)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return paho.topic_matches_sub(topic_filter, topic)


@dataclass(eq=False)
class _Link:
    """One connected client; ``paho`` is the paho client under it (for manual acks)."""

    client: aiomqtt.Client
    paho: paho.Client

    @property
    def alive(self) -> bool:
        return self.paho.is_connected()


@dataclass(slots=True)
class _AckToken:
    link: _Link
    acks: list[tuple[int, int]]  # (packet id, qos), in the order received


@register
class MqttClock(EventClock):
    """Emits an ``mqtt:message`` event per message matching ``topic``.

    Options: ``topic`` (required filter, wildcards allowed), ``host`` (default ``127.0.0.1``),
    ``port`` (1883), ``client_id`` (default derived from tenant/flow/name and the topic),
    ``qos`` (1 or 2, default 1), ``clean_session`` (default false), ``username``,
    ``password_env`` (environment variable holding the password), ``max_batch`` (default 100),
    ``batch_wait_ms`` (default 5), ``max_bytes`` (default 1 MiB).
    """

    type = "mqtt"
    options: ClassVar[frozenset[str]] = frozenset(
        {"topic", "host", "port", "client_id", "qos", "clean_session", "username"}
        | {"password_env", "max_batch", "batch_wait_ms", "max_bytes"}
    )
    #: longest wait between reconnect attempts while degraded
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.topic: str = opts["topic"]
        self.host: str = opts.get("host", "127.0.0.1")
        self.port: int = opts.get("port", 1883)
        self.client_id: str = opts.get("client_id") or default_client_id(spec.key, self.topic)
        self.qos: int = opts.get("qos", 1)
        self.clean_session: bool = opts.get("clean_session", False)
        self.username: str | None = opts.get("username")
        self.password_env: str | None = opts.get("password_env")
        self.max_batch: int = opts.get("max_batch", 100)
        self.batch_wait: float = opts.get("batch_wait_ms", 5) / 1000
        self.max_bytes: int = opts.get("max_bytes", MAX_PAYLOAD_BYTES)
        self._link: _Link | None = None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        topic = options.get("topic")
        if not isinstance(topic, str) or not topic:
            raise ValueError("an mqtt clock needs option 'topic' (a topic filter)")
        if problem := filter_problem(topic):
            raise ValueError(f"option 'topic' {topic!r} is not a valid filter: {problem}")
        for key in ("host", "client_id", "username", "password_env"):
            if options.get(key) is not None and not isinstance(options[key], str):
                raise ValueError(f"option {key!r} must be a string, got {options[key]!r}")
        if options.get("qos", 1) not in (1, 2) or isinstance(options.get("qos"), bool):
            raise ValueError(
                f"option 'qos' must be 1 or 2 (QoS 0 has no acks), got {options['qos']!r}"
            )
        if not isinstance(options.get("clean_session", False), bool):
            raise ValueError(
                f"option 'clean_session' must be true or false, got {options['clean_session']!r}"
            )
        for key, low, high, default in (
            ("port", 1, 65535, 1883),
            ("max_batch", 1, 10000, 100),
            ("batch_wait_ms", 0, 10000, 5),
            ("max_bytes", 1, 2**28, MAX_PAYLOAD_BYTES),
        ):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"option {key!r} must be an integer from {low} to {high}, got {value!r}"
                )

    @property
    def source(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.topic}"

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await _disconnect(link)

    async def ack(self, batch: Batch) -> None:
        token = batch.token
        if not isinstance(token, _AckToken) or not token.acks:
            return
        link = token.link
        if link is not self._link or not link.alive:
            log.info(
                "mqtt clock %s: the connection that delivered %d messages is gone; the broker "
                "redelivers them to the session and the ledger drops the duplicates",
                self.spec.key,
                len(token.acks),
            )
            return
        for mid, qos in token.acks:
            link.paho.ack(mid, qos)

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
            try:
                async for batch in self._consume(self._link):
                    yield batch
            except SOURCE_ERRORS as exc:
                self._degrade(f"connection to {self._where} lost: {self._cause(exc)}")
            link, self._link = self._link, None
            await _disconnect(link)
            await asyncio.sleep(backoff.next())

    @property
    def _where(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _degrade(self, reason: str) -> None:
        if self.state != "degraded":
            log.warning("mqtt clock %s degraded: %s", self.spec.key, reason)
        self.set_degraded(reason)

    async def _connect(self) -> _Link:
        password = os.environ.get(self.password_env) if self.password_env else None
        if self.password_env and password is None:
            raise aiomqtt.MqttError(f"environment variable {self.password_env} is not set")
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            clean_session=self.clean_session,
            username=self.username,
            password=password,
            keepalive=KEEPALIVE,
            timeout=CONNECT_TIMEOUT,
        )
        link = _Link(client, client._client)  # private: aiomqtt has no manual-ack API
        link.paho.manual_ack_set(True)
        try:
            await client.__aenter__()  # aiomqtt times out a missing CONNACK itself
        except BaseException:
            _close_socket(link)
            raise
        try:
            granted = await client.subscribe(self.topic, qos=self.qos, timeout=CONNECT_TIMEOUT)
            if any(getattr(code, "value", code) >= 0x80 for code in granted):
                raise SubscriptionRefused(f"subscription to {self.topic!r} refused")
        except BaseException:
            await _disconnect(link)
            raise
        return link

    async def _consume(self, link: _Link) -> AsyncIterator[Batch]:
        """Batches from ``link``; raises ``MqttError`` when the connection is lost.

        One receive task stays pending across batches: cancelling aiomqtt's iterator mid-wait
        could drop a message it already took off its queue (never acked, it would hold one of
        the broker's in-flight slots until the next reconnect).
        """
        messages = link.client.messages
        pending: asyncio.Future[aiomqtt.Message] | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(messages))
                received = [await pending]
                pending = None
                deadline = loop.time() + self.batch_wait
                while len(received) < self.max_batch:
                    pending = asyncio.ensure_future(anext(messages))
                    # queued messages are taken whatever the deadline; then wait out the rest
                    wait = None if len(messages) else max(0.0, deadline - loop.time())
                    done, _ = await asyncio.wait({pending}, timeout=wait)
                    if not done:
                        break
                    received.append(pending.result())
                    pending = None
                batch = self._batch(link, received)
                if len(batch):
                    yield batch
        finally:
            if pending is not None:
                pending.cancel()

    def _batch(self, link: _Link, received: list[aiomqtt.Message]) -> Batch:
        batch = Batch(token=_AckToken(link, []))
        for message in received:
            topic = str(message.topic)
            if not matches(self.topic, topic):
                # Left over from an older subscription of a reused client id: not ours.
                log.info("mqtt clock %s: dropping a message on %r", self.spec.key, topic)
                link.paho.ack(message.mid, message.qos)
                continue
            batch.token.acks.append((message.mid, message.qos))
            item = self._convert(topic, message)
            if isinstance(item, RawEvent):
                batch.events.append(item)
            else:
                batch.rejections.append(item)
        return batch

    def _convert(self, topic: str, message: aiomqtt.Message) -> RawEvent | Rejection:
        raw = message.payload if isinstance(message.payload, bytes) else b""
        body, reason, detail = parse_body(raw, self.max_bytes)
        eid = event_id(topic, raw, body)
        if body is None:
            return Rejection(reason=reason, detail=f"{detail} (topic {topic!r})", ref=eid)
        return RawEvent(
            id=eid,
            type="mqtt:message",
            occurred=utcnow_iso(),
            payload={"body": body, "topic": topic, "qos": message.qos, "retain": message.retain},
        )

    @staticmethod
    def _cause(exc: BaseException) -> str:
        cause = exc.__cause__ or exc
        return str(cause) or type(cause).__name__

    def _describe(self, exc: BaseException) -> str:
        """A human reason for ``degraded`` (never includes the password)."""
        text = self._cause(exc)
        if isinstance(exc, SubscriptionRefused):
            return f"{self._where} refused the subscription to {self.topic!r}: check the ACL"
        if isinstance(exc, aiomqtt.MqttCodeError) and exc.rc in (4, 5, 134, 135):
            return f"login to {self._where} refused: check the username and password ({text})"
        if isinstance(exc, (OSError, TimeoutError)) or "refused" in text.lower():
            return f"cannot reach the MQTT broker at {self._where}: {text}"
        return f"MQTT error at {self._where}: {text}"


async def _disconnect(link: _Link) -> None:
    """Close the connection (a clean DISCONNECT when possible); the session stays on the broker."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await link.client.__aexit__(None, None, None)
    _close_socket(link)


def _close_socket(link: _Link) -> None:
    """Drop the socket of a client that failed to connect or to disconnect in time (aiomqtt
    leaves it open and registered with the event loop in those cases)."""
    if link.paho.socket() is not None:
        with contextlib.suppress(Exception):
            link.paho._sock_close()  # private: unregisters it from the loop, closes it
