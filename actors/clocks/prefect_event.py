"""Prefect event clock: Prefect's own events (a flow run completed, a deployment changed ...)
trigger flows.

Live events come from Prefect's event stream, ``PrefectEventSubscriber`` over the websocket
``<api>/events/out`` with an ``EventFilter``. The websocket alone can miss events: its backfill
is clamped by the server (``PREFECT_SERVER_EVENTS_MAXIMUM_WEBSOCKET_BACKFILL``, 15 minutes) and
reads the events table, which the server's event persister fills a few seconds late (events
emitted while the clock was disconnected and not yet persisted when it reconnects are in neither
the backfill nor the live stream). So after every (re)connect the clock also sweeps the REST API
(``POST <api>/events/filter``, paged) from its cursor, at ``sweep_delays`` after connecting.
Both paths feed one queue, deduplicated by the event's own ``id``.

Cursor ``{"origin", "since", "acked"}``: ``since`` is where the next sweep starts (``overlap``
seconds before the oldest occurrence not known to be acked), ``acked`` the ids acked at or after
``since`` (so the overlap does not redeliver them). The first ``open`` saves ``origin = since =
now``: a new clock delivers the events that occur from then on (never older ones), and a
restart before any ack still sweeps from there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from prefect.client.orchestration import PrefectClient
from prefect.events.clients import PrefectCloudEventSubscriber, PrefectEventSubscriber
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_API_URL, get_current_settings

from actors.clocks import register
from actors.clocks.base import (
    Backoff,
    Batch,
    ClockSpec,
    CursorStore,
    EventClock,
    RawEvent,
    Rejection,
    mask_url,
)
from actors.event import MAX_PAYLOAD_BYTES, iso

__all__ = ["PrefectEventClock", "matches", "server_prefixes"]

log = logging.getLogger(__name__)

BODY_KEYS = ("id", "event", "occurred", "resource", "related", "payload", "follows")
PAGE_SIZE = 50  # the server's maximum for /events/filter
QUEUE_SIZE = 10_000
MAX_BATCH = 500


def matches(value: str, patterns: Iterable[str]) -> bool:
    """``value`` equals a pattern, or starts with a pattern ending in ``*`` (``*`` alone: all)."""
    return any(value.startswith(p[:-1]) if p.endswith("*") else value == p for p in patterns)


def server_prefixes(patterns: list[str]) -> list[str] | None:
    """What the server can filter on (prefixes; the exact match is checked here), or None."""
    prefixes = [p.removesuffix("*") for p in patterns]
    return None if "" in prefixes else prefixes


def describe_error(exc: BaseException, api_url: str) -> str:
    """A human reason for ``degraded`` (the URL's password masked)."""
    where = mask_url(api_url)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Prefect API at {where} refused access (HTTP {status}): check PREFECT_API_KEY"
    if isinstance(exc, OSError | asyncio.TimeoutError):
        return f"cannot reach the Prefect API at {where}: {type(exc).__name__}: {exc}"
    return f"Prefect event stream at {where} failed: {type(exc).__name__}: {exc}"


def subscriber(api_url: str, query: EventFilter) -> PrefectEventSubscriber:
    """Prefect's subscriber for ``api_url`` (Cloud: with ``PREFECT_API_KEY``), no own retries."""
    settings = get_current_settings()
    if api_url.startswith(str(settings.cloud.api_url)):
        key = settings.api.key.get_secret_value() if settings.api.key else None
        return PrefectCloudEventSubscriber(
            api_url=api_url, api_key=key, filter=query, reconnection_attempts=0
        )
    return PrefectEventSubscriber(api_url=api_url, filter=query, reconnection_attempts=0)


def rest_client(api_url: str) -> PrefectClient:
    """A REST client for ``api_url`` with the credentials of Prefect's settings."""
    api = get_current_settings().api
    return PrefectClient(
        api_url,
        api_key=api.key.get_secret_value() if api.key else None,
        auth_string=api.auth_string.get_secret_value() if api.auth_string else None,
    )


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


@register
class PrefectEventClock(EventClock):
    """Emits one event per Prefect event whose name (and resource id) match the patterns.

    Options: ``event`` (required: an event-name pattern or a list, ``"prefect.flow-run.*"``
    matches by prefix), ``resource`` (resource-id patterns, same form), ``api_url`` (default:
    ``PREFECT_API_URL``), ``overlap`` (seconds swept again below the cursor, default 60),
    ``max_bytes`` (largest event as JSON, default 1 MiB).
    """

    type = "prefect-event"
    options: ClassVar[frozenset[str]] = frozenset(
        {"api_url", "event", "resource", "overlap", "max_bytes"}
    )
    max_backoff: ClassVar[float] = 30.0
    #: seconds after each (re)connect at which the REST API is swept from the cursor; the last
    #: one must outlast the server's event persister flush (5 s by default)
    sweep_delays: ClassVar[tuple[float, ...]] = (0.0, 2.0, 8.0)

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.api_url_option: str | None = opts.get("api_url")
        self.events = _patterns(opts["event"])
        self.resources = _patterns(opts.get("resource"))
        self.overlap = timedelta(seconds=float(opts.get("overlap", 60)))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self._origin = self._since = datetime.now(UTC)
        self._acked: dict[str, datetime] = {}  # id -> occurred, acked at or after since
        self._inflight: dict[str, datetime] = {}  # id -> occurred, queued or yielded
        self._high: datetime | None = None  # latest occurrence acked

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if "event" not in options:
            raise ValueError("a prefect-event clock needs option 'event' (event-name patterns)")
        for key in ("event", "resource"):
            value = options.get(key)
            if value is None and key == "resource":
                continue
            patterns = value if isinstance(value, list) else [value]
            if not patterns or not all(
                isinstance(p, str) and p and "*" not in p[:-1] for p in patterns
            ):
                raise ValueError(
                    f"option {key!r} must be a pattern or a list of patterns ('*' only at the "
                    f"end), got {value!r}"
                )
        url = options.get("api_url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise ValueError(f"option 'api_url' must be an http(s) URL, got {mask_url(str(url))!r}")
        overlap = options.get("overlap", 60)
        if isinstance(overlap, bool) or not isinstance(overlap, int | float) or overlap < 0:
            raise ValueError(f"option 'overlap' must be a number of seconds >= 0, got {overlap!r}")
        size = options.get("max_bytes", 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"option 'max_bytes' must be a positive integer, got {size!r}")

    @property
    def api_url(self) -> str | None:
        """The option, else ``PREFECT_API_URL`` from the environment or the Prefect profile."""
        if self.api_url_option:
            return self.api_url_option
        return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None

    @property
    def source(self) -> str:
        return f"prefect-event+{mask_url(self.api_url or 'unset')}"

    async def open(self) -> None:
        saved = self.cursor.load()
        if saved is None:  # first start: events from now on, also after a restart without acks
            await asyncio.to_thread(self.cursor.save, self._cursor_value())
            return
        try:
            self._since = datetime.fromisoformat(saved["since"])
            self._origin = datetime.fromisoformat(saved.get("origin", saved["since"]))
            self._acked = {k: datetime.fromisoformat(v) for k, v in saved["acked"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("prefect-event clock %s: unreadable cursor, starting now", self.spec.key)
        self._high = max(self._acked.values(), default=None)

    def _cursor_value(self) -> dict[str, Any]:
        acked = {k: iso(v) for k, v in self._acked.items()}
        return {"origin": iso(self._origin), "since": iso(self._since), "acked": acked}

    async def ack(self, batch: Batch) -> None:
        for event_id, occurred in batch.token:
            self._inflight.pop(event_id, None)
            self._acked[event_id] = occurred
            self._high = occurred if self._high is None else max(self._high, occurred)
        if self._high is not None:
            floor = min([self._high, *self._inflight.values()])
            self._since = max(self._since, floor - self.overlap)
        self._acked = {k: v for k, v in self._acked.items() if v >= self._since}
        await asyncio.to_thread(self.cursor.save, self._cursor_value())

    async def batches(self) -> AsyncIterator[Batch]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self._inflight.clear()  # a restarted iteration gets every unacked event again
        runner = asyncio.create_task(self._run(queue))
        try:
            while True:
                batch = self._batch([await queue.get()])
                while not queue.empty() and len(batch) < MAX_BATCH:
                    self._add(batch, queue.get_nowait())
                yield batch
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    async def _run(self, queue: asyncio.Queue[Event]) -> None:
        """Connect, stream, sweep; on any source failure: degraded, back off, reconnect."""
        backoff = Backoff(initial=0.5, cap=self.max_backoff)
        while True:
            api_url = self.api_url
            try:
                if not api_url:
                    raise LookupError("no Prefect API URL: set option 'api_url' or PREFECT_API_URL")
                await self._session(api_url, queue, backoff)
                reason = f"the Prefect event stream at {mask_url(api_url)} closed"
            except LookupError as exc:
                reason = str(exc)
            except Exception as exc:
                reason = describe_error(exc, api_url or "")
            if self.state != "degraded":
                log.warning("prefect-event clock %s degraded: %s", self.spec.key, reason)
            self.set_degraded(reason)
            await asyncio.sleep(backoff.next())

    async def _session(self, api_url: str, queue: asyncio.Queue[Event], backoff: Backoff) -> None:
        """One connection: the live stream plus the sweeps; returns when the stream closes."""
        async with subscriber(api_url, self._filter()) as stream_in:
            self.set_listening()
            backoff.reset()
            stream = asyncio.create_task(self._stream(stream_in, queue))
            sweeps = asyncio.create_task(self._sweeps(api_url, queue))
            try:
                done, _ = await asyncio.wait({stream, sweeps}, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a failed sweep or stream ends the session
                await stream
            finally:
                for task in (stream, sweeps):
                    task.cancel()
                await asyncio.gather(stream, sweeps, return_exceptions=True)

    async def _stream(
        self, subscriber: PrefectEventSubscriber, queue: asyncio.Queue[Event]
    ) -> None:
        async for event in subscriber:
            await self._offer(event, queue)

    async def _sweeps(self, api_url: str, queue: asyncio.Queue[Event]) -> None:
        waited = 0.0
        for delay in self.sweep_delays:
            await asyncio.sleep(max(0.0, delay - waited))
            waited = delay
            await self._sweep(api_url, queue)

    async def _sweep(self, api_url: str, queue: asyncio.Queue[Event]) -> None:
        """Every stored event from ``since`` on (paged, oldest first) that is not known yet."""
        query = self._filter()
        query.occurred = EventOccurredFilter(
            since=self._since, until=datetime.now(UTC) + timedelta(days=1)
        )
        query.order = EventOrder.ASC
        async with rest_client(api_url) as client:
            page = await client.read_events(filter=query, limit=PAGE_SIZE)
            while True:
                for event in page.events:
                    await self._offer(event, queue)
                if not page.next_page:
                    return
                page = await client.read_events_page(str(page.next_page))

    def _filter(self) -> EventFilter:
        query = EventFilter(event=EventNameFilter(prefix=server_prefixes(self.events)))
        if self.resources:
            query.resource = EventResourceFilter(id_prefix=server_prefixes(self.resources))
        return query

    async def _offer(self, event: Event, queue: asyncio.Queue[Event]) -> None:
        """Queue ``event`` unless it does not match or is already queued, yielded or acked."""
        key = str(event.id)
        if key in self._inflight or key in self._acked or event.occurred < self._origin:
            return  # known, or from before this clock existed (the websocket backfills 1 min)
        if not matches(event.event, self.events):
            return
        if self.resources and not matches(event.resource.id, self.resources):
            return
        self._inflight[key] = event.occurred
        await queue.put(event)

    def _batch(self, events: list[Event]) -> Batch:
        batch = Batch(token=[])
        for event in events:
            self._add(batch, event)
        return batch

    def _add(self, batch: Batch, event: Event) -> None:
        key = str(event.id)
        batch.token.append((key, event.occurred))
        dumped = event.model_dump(mode="json")
        body = {k: dumped.get(k) for k in BODY_KEYS}
        size = len(json.dumps(body, separators=(",", ":")).encode())
        if size > self.max_bytes:
            detail = f"Prefect event {event.event} is {size} bytes, over max_bytes={self.max_bytes}"
            batch.rejections.append(Rejection("too_large", detail, key))
            return
        payload = {"body": body, "event": event.event, "resource_id": event.resource.id}
        batch.events.append(RawEvent(key, event.event, iso(event.occurred), payload))
