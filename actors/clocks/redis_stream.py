"""Redis Streams clock: one event per stream entry, read through a consumer group.

The clock is one consumer of a consumer group (created with ``MKSTREAM`` if missing). Reading
goes in three phases, repeated after every reconnect:

1. this consumer's own pending entries (``XREADGROUP ... 0``): anything received but not acked
   before a crash or a dropped reply comes back, with the same entry ids;
2. ``XAUTOCLAIM`` of entries idle longer than ``claim_idle_ms`` in any consumer of the group
   (a dead consumer's), repeated every ``claim_idle_ms / 2`` while running;
3. new entries (``XREADGROUP ... >``, blocking up to ``block_ms``). Each read blocks a random
   50-100% of ``block_ms`` (an entry still returns it at once), so a host's idle clocks do
   not wake in step: hundreds of them timing out together stall its event loop (and every
   other clock's ticks) once a ``block_ms``.

Entries are acknowledged (``XACK``) only in :meth:`RedisStreamClock.ack`, after the ledger holds
them. An unreachable server makes the clock ``degraded``; it retries with capped backoff and
never raises out of ``batches``. Passwords in the URL are masked wherever the URL is shown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

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
    mask_url,
    raise_if_cancelled,
)
from actors.event import MAX_PAYLOAD_BYTES, iso

__all__ = ["RedisStreamClock", "decode_entry", "mask_url"]

log = logging.getLogger(__name__)

_START = re.compile(r"^(\$|0|\d+(-\d+)?)$")
Entry = tuple[bytes, dict[bytes, bytes]]
T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0  # seconds a command may take beyond its own BLOCK time


def entry_time(entry_id: str) -> str:
    """The ISO time a stream entry id encodes (``<unix ms>-<seq>``)."""
    millis = int(entry_id.split("-", 1)[0])
    return iso(datetime.fromtimestamp(millis / 1000, tz=UTC))


def decode_entry(
    stream: str, entry_id: str, fields: dict[bytes, bytes], field: str, max_bytes: int
) -> RawEvent | Rejection:
    """One stream entry as an event, or the reason it cannot be one (pure)."""
    ref = f"{stream}:{entry_id}"
    if not fields:
        return Rejection("unreadable", "entry was deleted from the stream before it was acked", ref)
    raw = fields.get(field.encode())
    if raw is None:
        names = ", ".join(sorted(k.decode(errors="replace") for k in fields))
        return Rejection("malformed", f"entry has no field {field!r} (fields: {names})", ref)
    decoded = decode_json_object(raw, max_bytes, f"field {field!r}")
    if not isinstance(decoded, dict):
        return Rejection(*decoded, ref)
    body = decoded
    others = {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, v in fields.items()
        if k != field.encode()
    }
    payload = {"body": body, "entry_id": entry_id, "stream": stream, "fields": others}
    return RawEvent(
        id=ref, type="redis-stream:entry", occurred=entry_time(entry_id), payload=payload
    )


def describe_error(exc: Exception, where: str) -> str:
    """A human reason for ``degraded`` (the URL is already masked)."""
    if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
        return f"consumer group or stream vanished at {where}; recreating it"
    return f"redis at {where}: {type(exc).__name__}: {exc}"


def _positive_int(options: dict[str, Any], key: str) -> None:
    value = options.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"option {key!r} must be a positive integer, got {value!r}")


@register
class RedisStreamClock(EventClock):
    """Emits a ``redis-stream:entry`` event per entry of ``stream``; id ``<stream>:<entry id>``.

    Options: ``stream`` (required), ``url`` (default ``redis://127.0.0.1:6379/0``; a password
    may also come from ``REDIS_PASSWORD``), ``url_env`` (environment variable holding the URL;
    wins over ``url``), ``group`` (default ``listeners``), ``consumer``
    (default ``<tenant>/<flow>/<clock name>``), ``block_ms`` (1000), ``max_batch`` (500),
    ``claim_idle_ms`` (30000), ``start`` (``$`` or ``0``, where a new group starts; ``$``),
    ``max_bytes`` (1 MiB), ``field`` (the entry field holding the JSON body; ``data``).
    """

    type = "redis-stream"
    options: ClassVar[frozenset[str]] = frozenset(
        {"url", "url_env", "stream", "group", "consumer", "block_ms", "max_batch", "claim_idle_ms"}
        | {"start", "max_bytes", "field"}
    )
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.url_env: str | None = opts.get("url_env")
        self.url: str = opts.get("url") or "redis://127.0.0.1:6379/0"
        if self.url_env:  # shown masked in ``source``; read again at every connect
            self.url = os.environ.get(self.url_env) or f"redis://${self.url_env}"
        self.stream: str = opts["stream"]
        self.group: str = opts.get("group") or "listeners"
        self.consumer: str = opts.get("consumer") or spec.key
        self.block_ms = int(opts.get("block_ms", 1000))
        self.max_batch = int(opts.get("max_batch", 500))
        self.claim_idle_ms = int(opts.get("claim_idle_ms", 30000))
        self.start: str = str(opts.get("start", "$"))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self.field: str = opts.get("field") or "data"
        self._client: aioredis.Redis | None = None
        self._inflight: set[str] = set()  # yielded, not yet acked
        self._ready = False  # group ensured and pending phase started since (re)connect
        self._pending_from: str | None = None  # next id of the own-pending phase, None = done
        self._claim_from = "0-0"
        self._next_claim = 0.0

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        stream = options.get("stream")
        if not isinstance(stream, str) or not stream:
            raise ValueError("a redis-stream clock needs option 'stream' (a stream key)")
        url = options.get("url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ValueError("option 'url' must be a redis://, rediss:// or unix:// URL")
        for key in ("url_env", "group", "consumer", "field"):
            if options.get(key) is not None and (
                not isinstance(options[key], str) or not options[key]
            ):
                raise ValueError(f"option {key!r} must be a non-empty string, got {options[key]!r}")
        for key in ("block_ms", "max_batch", "claim_idle_ms", "max_bytes"):
            _positive_int(options, key)
        start = options.get("start", "$")
        if not isinstance(start, (str, int)) or not _START.match(str(start)):
            raise ValueError(
                f"option 'start' must be '$' (new entries) or '0' (all), got {start!r}"
            )

    @property
    def source(self) -> str:
        return f"{mask_url(self.url)}#{self.stream}"

    async def open(self) -> None:
        """Nothing to do yet: ``batches`` connects (and retries) on its own."""
        self._ready = False

    def _make_client(self) -> aioredis.Redis:
        url = self.url
        if self.url_env:
            url = os.environ.get(self.url_env, "")
            if not url:
                raise ConnectionError(f"environment variable {self.url_env!r} is not set")
            self.url = url
        return aioredis.Redis.from_url(
            url,
            password=urlsplit(url).password or os.environ.get("REDIS_PASSWORD"),
            socket_connect_timeout=CONNECT_TIMEOUT,
            # No socket_timeout: redis-py then writes through ``asyncio.wait_for``, which on
            # Python < 3.12 can swallow a cancellation (the clock would never stop). Every call
            # is bounded by ``asyncio.timeout`` in ``_call`` instead.
            socket_timeout=None,
            retry=Retry(NoBackoff(), 1),
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ack(self, batch: Batch) -> None:
        ids: list[str] = batch.token or []
        if not ids or self._client is None:
            return
        try:
            await self._call(self._client.xack(self.stream, self.group, *ids))
        except (RedisError, OSError) as exc:
            # Still pending: the own-pending phase after reconnect yields them again (same ids).
            log.warning("redis-stream clock %s: XACK failed (%s)", self.spec.key, exc)
            self._ready = False
        finally:
            self._inflight.difference_update(ids)

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=0.2, cap=self.max_backoff)
        while True:
            raise_if_cancelled()
            try:
                batch = await self._next_batch()
            except (RedisError, OSError) as exc:
                reason = describe_error(exc, mask_url(self.url))
                if self.state != "degraded":
                    log.warning("redis-stream clock %s degraded: %s", self.spec.key, reason)
                self.set_degraded(reason)
                self._ready = False
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            if batch is not None:
                self._inflight.update(batch.token)
                yield batch

    async def _next_batch(self) -> Batch | None:
        """One round of the current phase; ``None`` when it produced nothing new."""
        if self._client is None:
            self._client = self._make_client()
        if not self._ready:
            await self._ensure_group()
            self._pending_from, self._claim_from, self._next_claim = "0", "0-0", 0.0
            self._ready = True
        if self._pending_from is not None:
            return self._batch(await self._read_own_pending())
        if time.monotonic() >= self._next_claim:
            entries = await self._autoclaim()
            if entries:
                return self._batch(entries)
        assert self._client is not None
        reply = await self._call(
            self._client.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=self.max_batch,
                block=self.read_block_ms(),
            )
        )
        return self._batch(reply[0][1] if reply else [])

    def read_block_ms(self) -> int:
        """How long the next ``XREADGROUP ... >`` blocks: a random 50-100% of ``block_ms``."""
        return max(1, round(self.block_ms * random.uniform(0.5, 1.0)))

    async def _ensure_group(self) -> None:
        assert self._client is not None
        try:
            await self._call(
                self._client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
            )
            log.info("created consumer group %s on stream %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_own_pending(self) -> list[Entry]:
        assert self._client is not None and self._pending_from is not None
        reply = await self._call(
            self._client.xreadgroup(
                self.group, self.consumer, {self.stream: self._pending_from}, count=self.max_batch
            )
        )
        entries: list[Entry] = reply[0][1] if reply else []
        self._pending_from = entries[-1][0].decode() if entries else None
        return entries

    async def _autoclaim(self) -> list[Entry]:
        """Take over entries idle past ``claim_idle_ms`` (a dead consumer's), a page per call."""
        assert self._client is not None
        reply = await self._call(
            self._client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                self._claim_from,
                count=self.max_batch,
            )
        )
        cursor, entries = reply[0].decode(), reply[1]
        if cursor == "0-0":  # scanned the whole pending list: wait before the next scan
            interval = min(max(self.claim_idle_ms / 2000, 0.1), 30.0)
            self._next_claim = time.monotonic() + interval
        self._claim_from = cursor
        taken = [e for e in entries if e[0].decode() not in self._inflight]
        if taken:
            log.info("redis-stream clock %s claimed %d idle entries", self.spec.key, len(taken))
        return taken

    async def _call(self, command: Awaitable[T]) -> T:
        """Await one Redis command, bounded (a silent server raises ``TimeoutError``)."""
        async with asyncio.timeout(self.block_ms / 1000 + CALL_TIMEOUT):
            return await command

    def _batch(self, entries: list[Entry]) -> Batch | None:
        """Entries not already in flight, decoded; ``token`` lists the entry ids to ack."""
        batch = Batch(token=[])
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if entry_id in self._inflight:
                continue
            item = decode_entry(self.stream, entry_id, fields, self.field, self.max_bytes)
            if isinstance(item, Rejection):
                batch.rejections.append(item)
            else:
                batch.events.append(item)
            batch.token.append(entry_id)
        return batch if len(batch) else None
