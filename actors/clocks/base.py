"""The EventClock interface: one source subscription, shared by every connector.

A clock is an async stream of batches. Each batch holds :class:`RawEvent` items (stable ids)
and :class:`Rejection` items (input the clock could not turn into an event, with the reason).
The host pushes a batch to the coordinator and calls :meth:`EventClock.ack` only after the
coordinator confirms the ledger holds it durably; ``ack`` then advances the cursor or deletes
the source's messages. A clock that is restarted without an ack re-yields the same events with
the same ids, and the ledger turns them into duplicates: at-least-once plus idempotent claim.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit


@dataclass(slots=True)
class RawEvent:
    """An event as a clock sees it; the host adds tenant and flow."""

    id: str
    type: str
    occurred: str
    payload: Any


@dataclass(slots=True)
class Rejection:
    """Input that could not become an event. Counted, logged, acked (never a poison loop)."""

    reason: str  # short counter key: malformed, unreadable, too_large, ...
    detail: str
    ref: str = ""  # what was rejected (a path, a key, a message id)


@dataclass(slots=True)
class Batch:
    events: list[RawEvent] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Opaque, clock-specific data ``ack`` needs (receipt handles, cursor values, ...).
    token: Any = None

    def __len__(self) -> int:
        return len(self.events) + len(self.rejections)


@dataclass(frozen=True, slots=True)
class ClockSpec:
    """Where a clock sits and how it is configured (one entry of a flow's ``clocks``)."""

    tenant: str
    flow: str
    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.flow}/{self.name}"


class CursorStore:
    """A clock's resumable position: one JSON file, replaced atomically (write, fsync, rename).

    ``save(..., durable=False)`` skips the fsync: the new file still survives a kill of any
    process (it is in the OS's cache), only an OS crash may bring back the one before. For a
    clock whose events are all still in the ledger, that costs a re-delivery the ledger
    answers as duplicates, never a second run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_clock(cls, state_dir: Path, spec: ClockSpec) -> CursorStore:
        return cls(Path(state_dir) / "cursors" / spec.tenant / spec.flow / f"{spec.name}.json")

    def load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A torn or foreign file: start over; the ledger absorbs the re-delivery.
            return None

    def save(self, value: dict[str, Any], durable: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cursor-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh, separators=(",", ":"))
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


#: keys of a clock entry that are not options of the clock itself
# Keys every clock accepts: handled by the host, not by the clock itself.
GENERIC_KEYS = frozenset({"type", "name", "filter"})


def check_known_options(cls: type[EventClock], options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first option ``cls`` does not accept."""
    for key in options:
        if key not in cls.options and key not in GENERIC_KEYS:
            known = ", ".join(sorted(cls.options)) or "none"
            raise ValueError(f"unknown option {key!r} for a {cls.type} clock (accepted: {known})")


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


def decode_json_object(raw: bytes, max_bytes: int, what: str = "message body") -> Any:
    """The JSON object ``raw`` holds, or ``(reason, detail)`` saying why it is rejected: the
    one body rule every message connector applies (pure)."""
    if len(raw) > max_bytes:
        return "too_large", f"{what} is {len(raw)} bytes, over max_bytes={max_bytes}"
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        return "malformed", f"{what} is not valid JSON: {exc}"
    if not isinstance(body, dict):
        kind = _JSON_KINDS.get(type(body), "null" if body is None else "a boolean")
        return "malformed", f"{what} must be a JSON object, got {kind}"
    return body


def raise_if_cancelled() -> None:
    """Honour a cancellation a client library swallowed (``asyncio.wait_for`` before 3.12)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: safe to log and to show in ``status``."""
    try:
        parts = urlsplit(url)
        password, port = parts.password, parts.port
    except ValueError:
        return "<unparsable url>"
    if password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` passes (then it is set).

    Not ``asyncio.wait_for(event.wait(), t)``: before Python 3.12 that can swallow a
    cancellation arriving as the event fires, and the clock's task never stops.
    """
    handle = asyncio.get_running_loop().call_later(max(0.0, timeout), event.set)
    try:
        await event.wait()
    finally:
        handle.cancel()


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter, for clocks retrying an unreachable source."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    _current: float = 0.0

    def next(self) -> float:
        """Seconds to wait before the next attempt (grows on every call until ``reset``)."""
        grown = self._current * self.factor if self._current else self.initial
        self._current = min(self.cap, grown)
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._current = 0.0


class EventClock(ABC):
    """Base class of every clock. Subclasses set ``type`` and implement ``batches``.

    Lifecycle: ``await open()`` → ``async for batch in batches()`` → ``await ack(batch)`` after
    each durable push → ``await close()``. ``state`` is ``starting``, ``listening``,
    ``degraded`` (source unreachable, retrying; ``error`` says why) or ``stopped``.
    """

    type: ClassVar[str]
    #: option names this clock accepts (besides ``type`` and ``name``); typos fail validation
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        self.spec = spec
        self.cursor = cursor
        self.state = "starting"
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        """The ``source`` field of this clock's events (a URI-like description)."""
        return self.type

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad option (used by ``listeners validate``).

        The default rejects unknown option names; subclasses add their own checks.
        """
        check_known_options(cls, options)

    async def open(self) -> None:  # noqa: B027 - a real no-op for sources with no connection
        """Connect to the source, load the cursor. Default: nothing to do."""

    @abstractmethod
    def batches(self) -> AsyncIterator[Batch]:
        """Yield batches forever (until cancelled). Must not yield empty batches."""

    async def ack(self, batch: Batch) -> None:  # noqa: B027 - a real no-op for cursorless sources
        """The ledger holds ``batch`` durably: advance the cursor / delete the messages."""

    async def close(self) -> None:  # noqa: B027 - a real no-op when nothing is held open
        """Release connections."""

    def set_listening(self) -> None:
        self.state, self.error = "listening", None

    def set_degraded(self, reason: str) -> None:
        self.state, self.error = "degraded", reason
