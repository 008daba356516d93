"""Pure decoding of SQS messages into clock events, for the ``sqs`` and ``s3-sqs`` clocks.

Each function turns one received message (the dict boto3's ``ReceiveMessage`` returns) into
:class:`RawEvent` and :class:`Rejection` items, with no I/O, so every rule (ids, payload shape,
malformed and oversized bodies, S3 notification records) is testable without a queue.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from actors.clocks.base import RawEvent, Rejection
from actors.event import MAX_PAYLOAD_BYTES, iso, utcnow_iso

__all__ = ["Decoded", "decode_message", "decode_s3_notification"]

Decoded = list[RawEvent | Rejection]


def _sent_at(message: dict[str, Any]) -> str:
    millis = message.get("Attributes", {}).get("SentTimestamp")
    try:
        return iso(datetime.fromtimestamp(int(millis) / 1000, tz=UTC))
    except (TypeError, ValueError):
        return utcnow_iso()


def _parse_body(message: dict[str, Any], max_bytes: int) -> dict[str, Any] | Rejection:
    """The JSON object in the message body, or the :class:`Rejection` saying why not."""
    body, ref = message.get("Body", ""), message["MessageId"]
    size = len(body.encode())
    if size > max_bytes:
        return Rejection("too_large", f"message body is {size} bytes (limit {max_bytes})", ref)
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        return Rejection("malformed", f"message body is not valid JSON: {exc}", ref)
    if not isinstance(parsed, dict):
        kind = type(parsed).__name__
        return Rejection("malformed", f"message body is JSON {kind}, not an object", ref)
    return parsed


def decode_message(message: dict[str, Any], max_bytes: int = MAX_PAYLOAD_BYTES) -> Decoded:
    """One ``sqs`` event (or a rejection) for one received SQS message."""
    body = _parse_body(message, max_bytes)
    if isinstance(body, Rejection):
        return [body]
    system = message.get("Attributes", {})
    user = {
        name: value.get("StringValue", value.get("BinaryValue"))
        for name, value in message.get("MessageAttributes", {}).items()
    }
    payload = {
        "body": body,
        "message_id": message["MessageId"],
        "attributes": system,
        "message_attributes": user,
        "receive_count": int(system.get("ApproximateReceiveCount", 1)),
    }
    return [RawEvent(message["MessageId"], "sqs:Message", _sent_at(message), payload)]


def _record_event(record: Any, ref: str) -> RawEvent | Rejection:
    """The event of one ``ObjectCreated`` notification record."""
    try:
        bucket = record["s3"]["bucket"]["name"]
        obj = record["s3"]["object"]
        key = unquote_plus(obj["key"])
    except (KeyError, TypeError) as exc:
        return Rejection("malformed", f"S3 notification record lacks {exc}", ref)
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    version = obj.get("versionId")
    marker = etag or version or obj.get("sequencer")
    if not marker:
        return Rejection("malformed", f"S3 record for {bucket}/{key} has no eTag or versionId", ref)
    occurred = str(record.get("eventTime") or "")
    with contextlib.suppress(ValueError):
        occurred = iso(datetime.fromisoformat(occurred))
    payload = {
        "bucket": bucket,
        "key": key,
        "etag": etag,
        "size": obj.get("size", 0),
        "version_id": version,
        "event_name": record.get("eventName"),
        "event_time": record.get("eventTime"),
    }
    return RawEvent(
        f"{bucket}/{key}@{marker}", "s3:ObjectCreated", occurred or utcnow_iso(), payload
    )


def decode_s3_notification(
    message: dict[str, Any],
    max_bytes: int = MAX_PAYLOAD_BYTES,
    prefix: str = "",
    suffix: str = "",
) -> Decoded:
    """Events for the ``ObjectCreated`` records of an S3 notification message (direct, or
    wrapped in an SNS envelope). ``[]`` means: nothing to do, delete the message (a test event,
    other event names, keys outside ``prefix``/``suffix``)."""
    body = _parse_body(message, max_bytes)
    ref = message["MessageId"]
    if isinstance(body, Rejection):
        return [body]
    if body.get("Type") == "Notification" and isinstance(body.get("Message"), str):
        return decode_s3_notification(
            {**message, "Body": body["Message"]}, max_bytes, prefix, suffix
        )
    if body.get("Event") == "s3:TestEvent":
        return []
    records = body.get("Records")
    if not isinstance(records, list):
        return [Rejection("malformed", "message is not an S3 event notification (no Records)", ref)]
    out: Decoded = []
    for record in records:
        if not isinstance(record, dict):
            out.append(Rejection("malformed", "S3 notification record is not an object", ref))
            continue
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        item = _record_event(record, ref)
        if isinstance(item, RawEvent) and not (
            item.payload["key"].startswith(prefix) and item.payload["key"].endswith(suffix)
        ):
            continue
        out.append(item)
    return out
