"""NATS JetStream clock: one event per stream message, read by a durable pull consumer.

The consumer (explicit ack, ``ack_wait``) is durable and named after the clock, so a restarted
clock resumes where the acked messages end, and messages received but never acked are
redelivered by the server after ``ack_wait`` with the same stream sequence, hence the same id.
Messages are acked only in :meth:`NatsClock.ack`, after the ledger holds them. Rejected
messages (not JSON, not an object, too large) are *terminated* (``+TERM``) rather than acked:
both stop redelivery, but a termination also publishes a JetStream advisory
(``$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED``) so operators can see poison messages.

nats-py reconnects on its own: its disconnected/error callbacks make the clock ``degraded``
and a fetch that succeeds (or times out with the connection up) makes it ``listening`` again.
The first connection is retried here with capped backoff. Nothing is raised out of
``batches``; passwords in server URLs are masked wherever they are shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from actors.clocks import register
from actors.clocks.base import (
    Backoff,
    Batch,
    ClockSpec,
    CursorStore,
    EventClock,
    RawEvent,
    Rejection,
    decode_json_object,
    raise_if_cancelled,
)
from actors.event import MAX_PAYLOAD_BYTES, iso

__all__ = ["NatsClock", "decode_message", "durable_name", "mask_servers"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # one connection attempt (nats-py retries inside it, then we back off)
FLUSH_TIMEOUT = 5.0
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


def mask_servers(servers: list[str]) -> str:
    """Server URLs joined by commas, passwords replaced by ``***``."""
    masked = []
    for url in servers:
        parts = urlsplit(url)
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
            netloc += f":{parts.port}" if parts.port else ""
            url = urlunsplit(parts._replace(netloc=netloc))
        masked.append(url)
    return ",".join(masked)


def durable_name(spec: ClockSpec) -> str:
    """A valid, stable durable name for the clock (no ``.``, ``*``, ``>``, ``/``, spaces)."""
    readable = _NOT_IN_NAME.sub("_", f"{spec.tenant}-{spec.flow}-{spec.name}")[:48]
    return f"{readable}-{hashlib.sha256(spec.key.encode()).hexdigest()[:8]}"


def decode_message(
    stream: str, sequence: int, data: bytes, max_bytes: int
) -> dict[str, Any] | Rejection:
    """The JSON object a message carries, or why it is rejected (pure)."""
    decoded = decode_json_object(data, max_bytes)
    return decoded if isinstance(decoded, dict) else Rejection(*decoded, f"{stream}:{sequence}")


@dataclass(slots=True)
class Settle:
    """What ``ack`` does with a batch's messages: ack the events', terminate the rejected."""

    ack: list[Msg] = field(default_factory=list)
    term: list[Msg] = field(default_factory=list)


@register
class NatsClock(EventClock):
    """Emits a ``nats:message`` event per JetStream message; id ``<stream>:<stream sequence>``.

    Options: ``stream`` and ``subject`` (required; ``subject`` may hold wildcards), ``servers``
    (URL or list, default ``nats://127.0.0.1:4222``; credentials from the URL or ``NATS_TOKEN``,
    ``NATS_USER``/``NATS_PASSWORD``, ``NATS_CREDS``), ``durable`` (default from the clock's
    tenant/flow/name), ``ack_wait`` (seconds, 30), ``max_batch`` (100), ``fetch_timeout``
    (seconds, 1), ``max_bytes`` (1 MiB), ``create_stream`` (true).
    """

    type = "nats"
    options: ClassVar[frozenset[str]] = frozenset(
        {"servers", "stream", "subject", "durable", "ack_wait", "max_batch", "fetch_timeout"}
        | {"max_bytes", "create_stream"}
    )
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        servers = opts.get("servers") or "nats://127.0.0.1:4222"
        self.servers: list[str] = (
            [s.strip() for s in servers.split(",")] if isinstance(servers, str) else list(servers)
        )
        self.stream: str = opts["stream"]
        self.subject: str = opts["subject"]
        self.durable: str = opts.get("durable") or durable_name(spec)
        self.ack_wait = float(opts.get("ack_wait", 30))
        self.max_batch = int(opts.get("max_batch", 100))
        self.fetch_timeout = float(opts.get("fetch_timeout", 1.0))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self.create_stream = bool(opts.get("create_stream", True))
        self._nc: Client | None = None
        self._sub: Any = None  # JetStreamContext.PullSubscription
        self._closing = False
        self._last_error = ""  # the last connection error nats-py reported

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        for key in ("stream", "subject"):
            if not isinstance(options.get(key), str) or not options[key]:
                raise ValueError(f"a nats clock needs option {key!r} (a non-empty string)")
        if _NOT_IN_NAME.search(options["stream"]):
            raise ValueError(
                f"option 'stream' may hold only letters, digits, - and _: {options['stream']!r}"
            )
        servers = options.get("servers")
        urls = servers.split(",") if isinstance(servers, str) else servers
        if servers is not None and (
            not isinstance(urls, list)
            or not urls
            or not all(isinstance(u, str) and "://" in u for u in urls)
        ):
            raise ValueError("option 'servers' must be a nats:// URL or a list of them")
        durable = options.get("durable")
        if durable is not None and (not isinstance(durable, str) or _NOT_IN_NAME.search(durable)):
            raise ValueError(
                f"option 'durable' may hold only letters, digits, - and _: {durable!r}"
            )
        for key in ("ack_wait", "fetch_timeout"):
            value = options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"option {key!r} must be a positive number of seconds, got {value!r}"
                )
        for key in ("max_batch", "max_bytes"):
            value = options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option {key!r} must be a positive integer, got {value!r}")
        if not isinstance(options.get("create_stream", True), bool):
            raise ValueError("option 'create_stream' must be true or false")

    @property
    def source(self) -> str:
        return f"{mask_servers(self.servers)}#{self.stream}/{self.subject}"

    async def close(self) -> None:
        self._closing = True
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    await nc.close()

    async def ack(self, batch: Batch) -> None:
        settle: Settle = batch.token
        if settle is None:
            return
        try:
            for msg in settle.ack:
                await msg.ack()
            for msg in settle.term:
                await msg.term()
            if self._nc is not None and self._nc.is_connected:
                await self._nc.flush(FLUSH_TIMEOUT)
        except (nats.errors.Error, OSError) as exc:
            # Not acked: the server redelivers after ack_wait (same ids; the ledger dedupes).
            log.warning("nats clock %s: ack failed (%s)", self.spec.key, exc)

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=0.2, cap=self.max_backoff)
        while True:
            raise_if_cancelled()
            try:
                if self._sub is None:
                    await self._connect()
                msgs = await self._sub.fetch(self.max_batch, timeout=self.fetch_timeout)
            except nats.errors.TimeoutError:
                if self._nc is not None and self._nc.is_connected:
                    backoff.reset()
                    self.set_listening()  # reachable, nothing to read
                continue
            except (nats.errors.Error, OSError) as exc:
                self._degrade(self._describe(exc))
                if isinstance(exc, nats.js.errors.Error) or self._nc is None or self._nc.is_closed:
                    self._sub = None  # bind again (the stream or consumer may have vanished)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            batch = self._batch(msgs)
            if len(batch):
                yield batch

    async def _connect(self) -> None:
        """Connect, make sure the stream exists, bind the durable pull consumer."""
        if self._nc is None or self._nc.is_closed:
            self._nc = await self._open_connection()
        js = self._nc.jetstream()
        if self.create_stream:
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=self.stream, subjects=[self.subject])
                log.info("created JetStream stream %s for %s", self.stream, self.subject)
        config = ConsumerConfig(
            durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait
        )
        self._sub = await js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=config
        )

    async def _open_connection(self) -> Client:
        nc = Client()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await nc.connect(
                    servers=self.servers,
                    name=f"listener {self.spec.key}",
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,  # reconnect forever once connected
                    dont_randomize=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    **self._credentials(),
                )
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    await nc.close()
            raise
        return nc

    def _credentials(self) -> dict[str, Any]:
        """Credentials from the environment (URLs may carry their own user:password)."""
        env = os.environ
        if env.get("NATS_CREDS"):
            return {"user_credentials": env["NATS_CREDS"]}
        if env.get("NATS_TOKEN"):
            return {"token": env["NATS_TOKEN"]}
        if env.get("NATS_USER"):
            return {"user": env["NATS_USER"], "password": env.get("NATS_PASSWORD", "")}
        return {}

    def _batch(self, msgs: list[Msg]) -> Batch:
        batch = Batch(token=Settle())
        for msg in msgs:
            meta = msg.metadata
            sequence = meta.sequence.stream
            body = decode_message(self.stream, sequence, msg.data, self.max_bytes)
            if isinstance(body, Rejection):
                batch.rejections.append(body)
                batch.token.term.append(msg)
                continue
            payload = {
                "body": body,
                "subject": msg.subject,
                "sequence": sequence,
                "headers": dict(msg.headers or {}),
                "delivered": meta.num_delivered,
            }
            batch.events.append(
                RawEvent(
                    id=f"{self.stream}:{sequence}",
                    type="nats:message",
                    occurred=iso(meta.timestamp),
                    payload=payload,
                )
            )
            batch.token.ack.append(msg)
        return batch

    # -- connection state ---------------------------------------------------------------
    def _describe(self, exc: BaseException) -> str:
        where = mask_servers(self.servers)
        if isinstance(exc, nats.js.errors.NotFoundError) and not self.create_stream:
            return f"stream {self.stream!r} does not exist at {where} (create_stream is false)"
        if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)):
            return f"JetStream is not available at {where} (is the server started with -js?)"
        if isinstance(exc, nats.js.errors.APIError):
            return f"JetStream at {where} refused: {exc.description or exc}"
        if type(exc) is TimeoutError:  # our bound on one connection attempt
            return f"cannot connect to {where}" + (
                f": {self._last_error}" if self._last_error else ""
            )
        return f"nats at {where}: {type(exc).__name__}: {exc}"

    def _degrade(self, reason: str) -> None:
        if self._closing:
            return
        if self.state != "degraded":
            log.warning("nats clock %s degraded: %s", self.spec.key, reason)
        self.set_degraded(reason)

    async def _on_disconnected(self) -> None:
        self._degrade(f"disconnected from {mask_servers(self.servers)}; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("nats clock %s reconnected", self.spec.key)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._nc is None or not self._nc.is_connected:
            self._degrade(self._describe(exc))
        else:
            log.warning("nats clock %s: %s", self.spec.key, exc)
