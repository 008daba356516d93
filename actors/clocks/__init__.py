"""Clock registry: config ``type:`` → EventClock subclass."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TypeVar

from actors.clocks.base import Batch, ClockSpec, CursorStore, EventClock, RawEvent, Rejection
from actors.errors import ClockError

__all__ = [
    "CLOCK_TYPES",
    "Batch",
    "ClockSpec",
    "CursorStore",
    "EventClock",
    "MissingDependency",
    "RawEvent",
    "Rejection",
    "build_clock",
]


class MissingDependency(ClockError, ValueError):
    """A clock type whose optional dependency is not installed."""


# type → (module, extra that brings its third-party dependency). Modules load on first use,
# so a connector's SDK is imported only by clusters that use it.
LAZY_TYPES: dict[str, tuple[str, str | None]] = {
    "sqs": ("actors.clocks.sqs", None),
    "s3-sqs": ("actors.clocks.sqs", None),
    "redis-stream": ("actors.clocks.redis_stream", "redis"),
    "nats": ("actors.clocks.nats", "nats"),
    "amqp": ("actors.clocks.amqp", "amqp"),
    "mqtt": ("actors.clocks.mqtt", "mqtt"),
    "postgres": ("actors.clocks.postgres", "postgres"),
    "prefect-event": ("actors.clocks.prefect_event", None),
    "rrule": ("actors.clocks.time", None),
}


class ClockRegistry(MutableMapping[str, "type[EventClock]"]):
    """``type`` → clock class; connector modules are imported on first lookup."""

    def __init__(self) -> None:
        self._classes: dict[str, type[EventClock]] = {}

    def _available(self) -> set[str]:
        return set(self._classes) | {t for t, (m, _) in LAZY_TYPES.items() if _module_exists(m)}

    def __getitem__(self, name: str) -> type[EventClock]:
        if name not in self._classes and name in LAZY_TYPES:
            module, extra = LAZY_TYPES[name]
            if _module_exists(module):
                try:
                    importlib.import_module(module)
                except ImportError as exc:
                    hint = f"pip install 'listener-cluster[{extra}]'" if extra else "a reinstall"
                    raise MissingDependency(
                        f"clock type {name!r} needs the package {exc.name!r}: run {hint}"
                    ) from None
        return self._classes[name]

    def __setitem__(self, name: str, cls: type[EventClock]) -> None:
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._available()))

    def __len__(self) -> int:
        return len(self._available())

    def __contains__(self, name: object) -> bool:
        return name in self._available()


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


CLOCK_TYPES = ClockRegistry()


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
