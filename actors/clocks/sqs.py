"""SQS clocks: ``sqs`` (one event per queue message) and ``s3-sqs`` (S3 event notifications
delivered through a queue, one event per created object).

Messages are received with long polling (``ReceiveMessage`` in a worker thread: boto3 blocks)
and stay invisible while the host pushes them: a background task extends the visibility of
every received, not yet acked message every ``visibility_timeout / 2`` seconds, so a slow push
is not redelivered. Messages are deleted only in ``ack``, after the ledger holds the batch; a
clock that dies before its ack stops extending, and SQS redelivers the messages with the same
``MessageId`` once their visibility timeout lapses. The queue's redrive policy is left alone
(the approximate receive count is reported in the payload). Turning a message into events is a
pure function of the message (:mod:`actors.clocks.sqs_messages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar
from urllib.parse import urlparse, urlunparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from actors.clocks import register
from actors.clocks.base import Backoff, Batch, ClockSpec, CursorStore, EventClock, RawEvent
from actors.clocks.base import mask_url as base_mask_url
from actors.clocks.sqs_messages import Decoded, decode_message, decode_s3_notification
from actors.event import MAX_PAYLOAD_BYTES

__all__ = ["S3SqsClock", "SqsClock", "describe_error", "mask_url"]

log = logging.getLogger(__name__)

SQS_BATCH = 10  # the most ReceiveMessage / DeleteMessageBatch handle in one call


def mask_url(url: str | None) -> str:
    """The endpoint for messages: ``AWS`` when none is set, else masked like any URL."""
    return "AWS" if not url else base_mask_url(url)


def describe_error(exc: Exception, queue: str, endpoint: str | None) -> str:
    """A human reason for ``degraded`` (never includes credentials)."""
    where = mask_url(endpoint)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if "NonExistentQueue" in code or code == "QueueDoesNotExist":
            return f"queue {queue!r} does not exist at {where}"
        if code in ("AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "403"):
            return f"access to queue {queue!r} denied at {where} ({code}): check credentials"
        return f"SQS call for queue {queue!r} at {where} failed: {code or exc}"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach SQS endpoint {where}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    return f"SQS error at {where}: {type(exc).__name__}"


def _check_number(options: dict[str, Any], key: str, low: float, high: float) -> None:
    value = options.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"option {key!r} must be a number from {low:g} to {high:g}, got {value!r}")


@register
class SqsClock(EventClock):
    """Emits one ``sqs:Message`` event per queue message; its id is the SQS ``MessageId``.

    Options: ``queue_url``, or ``queue_name`` (resolved with ``GetQueueUrl``); ``endpoint_url``
    (an SQS-compatible server); ``region`` (default from the queue URL, ``AWS_REGION``,
    ``AWS_DEFAULT_REGION``, else ``us-east-1``); ``wait_time`` (long-poll seconds, 0-20, default
    10); ``max_batch`` (messages per batch, default 100); ``visibility_timeout`` (seconds,
    default 30); ``max_bytes`` (largest accepted body, default 1 MiB).
    """

    type = "sqs"
    options: ClassVar[frozenset[str]] = frozenset(
        {
            "queue_url",
            "queue_name",
            "endpoint_url",
            "region",
            "wait_time",
            "max_batch",
            "visibility_timeout",
            "max_bytes",
        }
    )
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.queue_url: str | None = opts.get("queue_url")
        self.queue_name: str = opts.get("queue_name") or urlparse(self.queue_url or "").path
        self.queue_name = self.queue_name.rstrip("/").rsplit("/", 1)[-1]
        self.endpoint_url: str | None = opts.get("endpoint_url") or _endpoint_of(self.queue_url)
        self.region: str = (
            opts.get("region")
            or _region_of(self.queue_url)
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.wait_time = int(opts.get("wait_time", 10))
        self.max_batch = int(opts.get("max_batch", 100))
        self.visibility_timeout = int(opts.get("visibility_timeout", 30))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self._client: Any = None
        self._inflight: dict[str, str] = {}  # message id -> latest receipt handle, until acked
        self._extender: asyncio.Task[None] | None = None
        # Long polls run on the clock's own thread, so a poll still in flight after ``close``
        # holds up neither the event loop's shutdown nor the other SQS calls.
        self._poller: ThreadPoolExecutor | None = None
        self._closing = False

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if not options.get("queue_url") and not options.get("queue_name"):
            raise ValueError(f"an {cls.type} clock needs option 'queue_url' or 'queue_name'")
        for key in ("queue_name", "region", *(o for o in ("prefix", "suffix") if o in cls.options)):
            if options.get(key) is not None and not isinstance(options[key], str):
                raise ValueError(f"option {key!r} must be a string, got {options[key]!r}")
        for key in ("queue_url", "endpoint_url"):
            url = options.get(key)
            if url is not None and (
                not isinstance(url, str) or not url.startswith(("http://", "https://"))
            ):
                raise ValueError(f"option {key!r} must be an http(s) URL, got {mask_url(str(url))}")
        _check_number(options, "wait_time", 0, 20)
        _check_number(options, "max_batch", 1, 10_000)
        _check_number(options, "visibility_timeout", 1, 43_200)
        _check_number(options, "max_bytes", 1, 16 * MAX_PAYLOAD_BYTES)

    @property
    def source(self) -> str:
        return f"{self.type}://{self.queue_name}"

    async def open(self) -> None:
        self._closing = False
        self._client = await asyncio.to_thread(self._make_client)
        self._poller = ThreadPoolExecutor(1, thread_name_prefix=f"sqs-{self.queue_name}")
        self._extender = asyncio.create_task(self._extend_forever())

    async def close(self) -> None:
        """Stop extending (unacked messages reappear after their visibility timeout). Does not
        wait for a long poll in flight: it releases what it receives and closes the client."""
        self._closing = True
        extender, self._extender = self._extender, None
        if extender is not None:
            extender.cancel()
            with contextlib.suppress(BaseException):
                await extender
        self._inflight.clear()
        client, self._client = self._client, None
        poller, self._poller = self._poller, None
        if poller is not None:
            if client is not None:
                poller.submit(client.close)  # runs after the poll in flight, if any
            poller.shutdown(wait=False)
        elif client is not None:
            await asyncio.to_thread(client.close)

    async def ack(self, batch: Batch) -> None:
        """Delete the batch's messages (also those that only carried rejections). If that fails,
        SQS redelivers them after the visibility timeout and the ledger absorbs the duplicates."""
        handles = [(mid, self._inflight.pop(mid)) for mid in batch.token if mid in self._inflight]
        await self._call_quietly("delete_message_batch", handles, {}, logging.WARNING)

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=0.5, cap=self.max_backoff)
        while True:
            try:
                messages = await self._receive()
            except (BotoCoreError, ClientError) as exc:
                reason = describe_error(exc, self.queue_name, self.endpoint_url)
                if self.state != "degraded":
                    log.warning("%s clock %s degraded: %s", self.type, self.spec.key, reason)
                self.set_degraded(reason)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            batch, ignored = self._batch(messages)
            await self._call_quietly("delete_message_batch", ignored, {}, logging.INFO)
            if len(batch):
                yield batch

    # -- decoding -------------------------------------------------------------------------
    def decode(self, message: dict[str, Any]) -> Decoded:
        return decode_message(message, self.max_bytes)

    def _batch(self, messages: Iterable[dict[str, Any]]) -> tuple[Batch, list[tuple[str, str]]]:
        """The batch of ``messages`` and the (id, handle) of those with nothing to deliver."""
        batch, ignored = Batch(token=[]), []
        for message in messages:
            mid = message["MessageId"]
            items = self.decode(message)
            if not items:
                ignored.append((mid, self._inflight.pop(mid, message["ReceiptHandle"])))
                continue
            batch.token.append(mid)
            for item in items:
                (batch.events if isinstance(item, RawEvent) else batch.rejections).append(item)
        return batch, ignored

    # -- SQS calls (blocking, run in worker threads) ----------------------------------------
    def _make_client(self) -> Any:
        config = Config(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=self.wait_time + 10,
        )
        return boto3.session.Session().client(
            "sqs", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )

    def _resolve(self, client: Any) -> str:
        if self.queue_url is None:
            self.queue_url = client.get_queue_url(QueueName=self.queue_name)["QueueUrl"]
        return self.queue_url

    async def _receive(self) -> list[dict[str, Any]]:
        """Up to ``max_batch`` new messages: one long poll, then drain what is there."""
        got: list[dict[str, Any]] = []
        wait = self.wait_time
        while len(got) < self.max_batch:
            want = min(SQS_BATCH, self.max_batch - len(got))
            try:
                fresh = await asyncio.get_running_loop().run_in_executor(
                    self._poller, self._receive_once, self._client, want, wait
                )
            except (BotoCoreError, ClientError):
                if got:
                    break  # deliver what we have; the next poll reports the outage
                raise
            for message in fresh:
                seen = message["MessageId"] in self._inflight
                self._inflight[message["MessageId"]] = message["ReceiptHandle"]
                if not seen:  # a redelivery of an unacked message: newest handle, no new event
                    got.append(message)
            if len(fresh) < want:
                break
            wait = 0
        return got

    def _receive_once(self, client: Any, count: int, wait: int) -> list[dict[str, Any]]:
        url = self._resolve(client)
        response = client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=wait,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if self._closing and messages:  # the clock closed during the poll: hand them back now
            handles = [(m["MessageId"], m["ReceiptHandle"]) for m in messages]
            self._per_chunk(
                client, "change_message_visibility_batch", handles, {"VisibilityTimeout": 0}
            )
            return []
        return messages

    def _per_chunk(
        self, client: Any, call: str, handles: list[tuple[str, str]], extra: dict[str, Any]
    ) -> None:
        """``call`` (a ``*Batch`` SQS operation) on ``handles``, ten at a time."""
        url = self._resolve(client)
        for start in range(0, len(handles), SQS_BATCH):
            chunk = handles[start : start + SQS_BATCH]
            entries = [
                {"Id": str(i), "ReceiptHandle": handle, **extra}
                for i, (_, handle) in enumerate(chunk)
            ]
            response = getattr(client, call)(QueueUrl=url, Entries=entries)
            for failed in response.get("Failed", []):
                log.info(
                    "%s: %s of message %s failed: %s",
                    self.spec.key,
                    call,
                    chunk[int(failed["Id"])][0],
                    failed.get("Code"),
                )

    # -- background -------------------------------------------------------------------------
    async def _call_quietly(
        self, call: str, handles: list[tuple[str, str]], extra: dict[str, Any], level: int
    ) -> None:
        client = self._client
        if not handles or client is None:
            return
        try:
            await asyncio.to_thread(self._per_chunk, client, call, handles, extra)
        except (BotoCoreError, ClientError) as exc:
            reason = describe_error(exc, self.queue_name, self.endpoint_url)
            log.log(
                level, "%s: %s of %d messages failed: %s", self.spec.key, call, len(handles), reason
            )

    async def _extend_forever(self) -> None:
        """Keep received, unacked messages invisible while the host pushes them."""
        period = self.visibility_timeout / 2
        while True:
            await asyncio.sleep(period)
            extra = {"VisibilityTimeout": self.visibility_timeout}
            handles = list(self._inflight.items())
            await self._call_quietly(
                "change_message_visibility_batch", handles, extra, logging.INFO
            )


@register
class S3SqsClock(SqsClock):
    """Emits one ``s3:ObjectCreated`` event per ``ObjectCreated`` record of the S3 event
    notifications in a queue; id ``<bucket>/<key>@<etag or versionId>`` like the ``s3`` clock.

    Options: those of ``sqs``, plus ``prefix`` and ``suffix`` (only keys starting/ending so).
    Test events and other event names are deleted without an event.
    """

    type = "s3-sqs"
    options: ClassVar[frozenset[str]] = SqsClock.options | {"prefix", "suffix"}

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.prefix: str = spec.options.get("prefix") or ""
        self.suffix: str = spec.options.get("suffix") or ""

    def decode(self, message: dict[str, Any]) -> Decoded:
        return decode_s3_notification(message, self.max_bytes, self.prefix, self.suffix)


def _endpoint_of(queue_url: str | None) -> str | None:
    """A non-AWS queue URL's server (``http://host:port``); ``None`` for AWS's own."""
    if not queue_url:
        return None
    parsed = urlparse(queue_url)
    if (parsed.hostname or "").endswith("amazonaws.com"):
        return None
    return urlunparse(parsed._replace(path="", params="", query="", fragment=""))


def _region_of(queue_url: str | None) -> str | None:
    """``eu-west-1`` from ``https://sqs.eu-west-1.amazonaws.com/...``."""
    host = urlparse(queue_url or "").hostname or ""
    parts = host.split(".")
    if host.endswith("amazonaws.com") and len(parts) >= 4 and parts[0] == "sqs":
        return parts[1]
    return None
