"""The event model: what a clock produces, what the ledger keys on, what a flow receives."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from actors.errors import EventError

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ID_LENGTH = 1024


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat()


def iso(dt: datetime) -> str:
    """ISO-8601 in UTC, the one time format events carry."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat()


def body_hash(payload: Any) -> str:
    """Stable id for a payload whose sender gave none: sha256 of canonical JSON."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(slots=True)
class Event:
    """One real-world occurrence, addressed to one flow of one tenant.

    ``id`` is stable for the same occurrence, so the ledger can enforce one run per
    ``(tenant, flow, id)``. ``payload`` is any JSON value (sources give objects).
    """

    id: str
    tenant: str
    flow: str
    source: str
    type: str
    occurred: str = field(default_factory=utcnow_iso)
    payload: Any = None
    received: float = 0.0  # wall-clock seconds when the cluster first saw it (for latency)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.tenant, self.flow, self.id)

    def to_dict(self) -> dict[str, Any]:
        """What the flow's event parameter receives (``received`` is internal)."""
        d = asdict(self)
        del d["received"]
        return d

    def to_wire(self) -> list[Any]:
        return [
            self.id,
            self.tenant,
            self.flow,
            self.source,
            self.type,
            self.occurred,
            self.payload,
            self.received,
        ]

    @classmethod
    def from_wire(cls, row: list[Any]) -> Event:
        return cls(*row)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(
            id=str(d["id"]),
            tenant=str(d["tenant"]),
            flow=str(d["flow"]),
            source=str(d.get("source", "")),
            type=str(d.get("type", "event")),
            occurred=str(d.get("occurred") or utcnow_iso()),
            payload=d.get("payload"),
            received=float(d.get("received", 0.0)),
        )


def check_event_id(event_id: Any) -> str:
    if not isinstance(event_id, str) or not event_id:
        raise EventError("event id must be a non-empty string", reason="bad_id")
    if len(event_id) > MAX_ID_LENGTH:
        raise EventError(
            f"event id is {len(event_id)} characters, the limit is {MAX_ID_LENGTH}",
            reason="bad_id",
        )
    return event_id


def parse_ingress_body(body: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str | None, Any]:
    """Validate a webhook/emit body ``{"id": optional, "payload": {...}}``.

    Returns ``(id or None, payload)``; raises :class:`EventError` with the HTTP status to answer.
    """
    if len(body) > max_bytes:
        raise EventError(
            f"body is {len(body)} bytes, the limit is {max_bytes}", reason="too_large", status=413
        )
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EventError(f"body must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"id", "payload", "type", "occurred"}
    if unknown:
        raise EventError(f"unknown keys in body: {sorted(unknown)}")
    if "payload" not in doc:
        raise EventError("body has no 'payload'")
    payload = doc["payload"]
    if not isinstance(payload, dict):
        raise EventError(f"'payload' must be a JSON object, got {type(payload).__name__}")
    event_id = doc.get("id")
    if event_id is not None:
        check_event_id(event_id)
    return event_id, payload
