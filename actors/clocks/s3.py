"""S3 clock: one event per new or overwritten object under a bucket prefix.

Polls ``ListObjectsV2`` (paginated, in a worker thread: boto3 is blocking) and compares the
listing with the cursor, a map ``key -> etag`` of acked objects. Which objects to emit is a pure
function of (listing, cursor). An unreachable endpoint, a missing bucket or bad credentials make
the clock ``degraded`` and it retries with capped backoff; nothing is raised out of ``batches``.
Credentials come from boto3's standard provider chain and are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any, ClassVar

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
from actors.event import iso

__all__ = ["S3Clock", "objects_to_emit"]

log = logging.getLogger(__name__)

BATCH_CAP = 1000
MIN_POLL = 0.05
_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}


def objects_to_emit(
    listing: Iterable[dict[str, Any]], done: dict[str, str]
) -> list[dict[str, Any]]:
    """Objects of a ``ListObjectsV2`` listing whose key is not in ``done`` with the same etag."""
    return [obj for obj in listing if done.get(obj["Key"]) != obj["ETag"].strip('"')]


def describe_error(exc: Exception, bucket: str, endpoint: str | None) -> str:
    """A human reason for ``degraded`` (never includes credentials)."""
    where = endpoint or "AWS"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return f"bucket {bucket!r} does not exist at {where}"
        if code in _CREDENTIAL_CODES or code in ("403", "Forbidden"):
            return f"access to bucket {bucket!r} denied at {where} ({code}): check credentials"
        return f"listing bucket {bucket!r} at {where} failed: {code or exc}"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach S3 endpoint {where}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    return f"S3 error at {where}: {type(exc).__name__}: {exc}"


@register
class S3Clock(EventClock):
    """Emits an ``s3:ObjectCreated`` event per object (new key, or new etag of a known key).

    Options: ``bucket`` (required), ``prefix`` (default ``""``), ``suffix`` (only keys ending so),
    ``endpoint_url`` (S3-compatible server), ``region`` (default ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` / ``us-east-1``), ``poll_interval`` (seconds, default 5.0, min 0.05),
    ``max_keys`` (page size of each ``ListObjectsV2`` call, 1-1000).
    """

    type = "s3"
    options: ClassVar[frozenset[str]] = frozenset(
        {"bucket", "prefix", "suffix", "endpoint_url", "region", "poll_interval", "max_keys"}
    )
    #: longest wait between retries while degraded
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.bucket: str = opts["bucket"]
        self.prefix: str = opts.get("prefix") or ""
        self.suffix: str = opts.get("suffix") or ""
        self.endpoint_url: str | None = opts.get("endpoint_url")
        self.region: str = (
            opts.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.poll_interval = max(MIN_POLL, float(opts.get("poll_interval", 5.0)))
        self.max_keys = int(opts.get("max_keys", 1000))
        self._client: Any = None
        self._acked: dict[str, str] = {}  # key -> etag, persisted in ack
        self._inflight: dict[str, str] = {}  # yielded, not yet acked

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        bucket = options.get("bucket")
        if not isinstance(bucket, str) or not bucket:
            raise ValueError("an s3 clock needs option 'bucket' (a bucket name)")
        for key in ("prefix", "suffix", "region"):
            if options.get(key) is not None and not isinstance(options[key], str):
                raise ValueError(f"option {key!r} must be a string, got {options[key]!r}")
        url = options.get("endpoint_url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise ValueError(f"option 'endpoint_url' must be an http(s) URL, got {url!r}")
        poll = options.get("poll_interval", 5.0)
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll < MIN_POLL:
            raise ValueError(f"option 'poll_interval' must be a number >= {MIN_POLL}, got {poll!r}")
        keys = options.get("max_keys", 1000)
        if isinstance(keys, bool) or not isinstance(keys, int) or not 1 <= keys <= 1000:
            raise ValueError(f"option 'max_keys' must be an integer from 1 to 1000, got {keys!r}")

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    async def open(self) -> None:
        saved = self.cursor.load() or {}
        objects = saved.get("objects")
        self._acked = (
            {str(k): str(v) for k, v in objects.items()} if isinstance(objects, dict) else {}
        )
        self._client = await asyncio.to_thread(self._make_client)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def ack(self, batch: Batch) -> None:
        for key, etag in batch.token.items():
            self._acked[key] = etag
            if self._inflight.get(key) == etag:
                del self._inflight[key]
        await asyncio.to_thread(self.cursor.save, {"objects": dict(self._acked)})

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=self.poll_interval, cap=max(self.poll_interval, self.max_backoff))
        while True:
            try:
                listing = await asyncio.to_thread(self._list)
            except (BotoCoreError, ClientError) as exc:
                reason = describe_error(exc, self.bucket, self.endpoint_url)
                if self.state != "degraded":
                    log.warning("s3 clock %s degraded: %s", self.spec.key, reason)
                self.set_degraded(reason)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            present = {obj["Key"] for obj in listing}
            self._acked = {k: v for k, v in self._acked.items() if k in present}
            fresh = objects_to_emit(listing, {**self._acked, **self._inflight})
            for start in range(0, len(fresh), BATCH_CAP):
                batch = self._batch(fresh[start : start + BATCH_CAP])
                self._inflight.update(batch.token)
                yield batch
            await asyncio.sleep(self.poll_interval)

    def _batch(self, objects: list[dict[str, Any]]) -> Batch:
        batch = Batch(token={})
        for obj in objects:
            key, etag = obj["Key"], obj["ETag"].strip('"')
            modified = iso(obj["LastModified"])
            batch.events.append(
                RawEvent(
                    id=f"{self.bucket}/{key}@{etag}",
                    type="s3:ObjectCreated",
                    occurred=modified,
                    payload={
                        "bucket": self.bucket,
                        "key": key,
                        "etag": etag,
                        "size": obj.get("Size", 0),
                        "last_modified": modified,
                    },
                )
            )
            batch.token[key] = etag
        return batch

    def _make_client(self) -> Any:
        config = Config(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        session = boto3.session.Session()
        return session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )

    def _list(self) -> list[dict[str, Any]]:
        """Every object under the prefix (and with the suffix), across all pages."""
        if self._client is None:
            self._client = self._make_client()
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.max_keys}
        )
        return [
            obj
            for page in pages
            for obj in page.get("Contents", ())
            if not self.suffix or obj["Key"].endswith(self.suffix)
        ]
