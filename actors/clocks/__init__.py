"""Clock registry: config ``type:`` → EventClock subclass."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from actors.clocks.base import Batch, ClockSpec, CursorStore, EventClock, RawEvent, Rejection

__all__ = [
    "CLOCK_TYPES",
    "Batch",
    "ClockSpec",
    "CursorStore",
    "EventClock",
    "RawEvent",
    "Rejection",
    "build_clock",
]

CLOCK_TYPES: dict[str, type[EventClock]] = {}


C = TypeVar("C", bound=type[EventClock])


def register(cls: C) -> C:
    CLOCK_TYPES[cls.type] = cls
    return cls


def build_clock(spec: ClockSpec, state_dir: Path) -> EventClock:
    try:
        cls = CLOCK_TYPES[spec.type]
    except KeyError:
        raise ValueError(
            f"unknown clock type {spec.type!r}; known: {', '.join(sorted(CLOCK_TYPES))}"
        ) from None
    return cls(spec, CursorStore.for_clock(state_dir, spec))


def _load_builtin() -> None:
    # Imported for their @register side effect.
    from actors.clocks import directory, s3, time, webhook  # noqa: F401


_load_builtin()
