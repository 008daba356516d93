"""Small Prefect flows used by the flow-runner tests (keep them import-light)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from prefect import flow, task

from actors.flow_runner import current_attempt

# What the flows saw, keyed by event id: tests read it back.
SEEN: dict[str, dict[str, Any]] = {}


def _record(event: dict[str, Any], **extra: Any) -> None:
    SEEN[event["id"]] = {"event": event, "attempt": current_attempt(), **extra}


@flow
def sync_flow(event: dict[str, Any] | None = None) -> int:
    _record(event or {"id": "none"}, thread=threading.current_thread().name)
    return 1


@flow
async def async_flow(event: dict[str, Any] | None = None) -> int:
    await asyncio.sleep(0)
    _record(event or {"id": "none"})
    return 2


@flow
def custom_param_flow(record: dict[str, Any] | None = None, scale: int = 2) -> int:
    _record(record or {"id": "none"}, scale=scale)
    return scale


@flow
def no_event_flow(x: int = 1) -> int:
    return x


@flow
def needs_more_flow(event: dict[str, Any], other: int) -> int:
    return other


@flow
def failing_flow(event: dict[str, Any] | None = None) -> None:
    raise ValueError(f"boom for {(event or {}).get('id')}")


@flow
async def async_failing_flow(event: dict[str, Any] | None = None) -> None:
    raise KeyError("missing")


@flow
def sleepy_flow(event: dict[str, Any] | None = None) -> None:
    time.sleep(float((event or {}).get("payload", {}).get("sleep", 0.2)))
    _record(event or {"id": "none"}, thread=threading.current_thread().name)


@flow
def unpicklable_result_flow(event: dict[str, Any] | None = None) -> Any:
    return threading.Lock()


@task
def add_one(x: int) -> int:
    return x + 1


@flow
def task_flow(event: dict[str, Any] | None = None) -> int:
    return add_one(1)


#: heartbeat settings seen inside runs of ``heartbeat_probe`` (the runner runs flows in-process)
HEARTBEAT_SEEN: list[Any] = []


@flow
def heartbeat_probe(event: dict[str, Any] | None = None) -> None:
    from prefect.settings import get_current_settings

    HEARTBEAT_SEEN.append(get_current_settings().flows.heartbeat_frequency)


@flow(flow_run_name="own-{event[id]}")
def self_named_flow(event: dict[str, Any] | None = None) -> int:
    _record(event or {"id": "none"})
    return 3
