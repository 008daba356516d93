"""Small Prefect flows for the coordinator tests, run by real FlowWorkers with tracking off.

Each flow records what it saw in ``CALLS`` (event id → list of attempts), so a test can
assert exactly how many times, and with which attempt numbers, a flow body ran.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from prefect import flow

from actors.flow_runner import current_attempt

CALLS: defaultdict[str, list[int | None]] = defaultdict(list)
EVENTS: dict[str, dict[str, Any]] = {}
#: event ids for which ``breakable_flow`` fails (tests add and remove ids)
BROKEN: set[str] = set()
#: ``gated_flow`` waits for this event when a test sets one
GATE: asyncio.Event | None = None


def reset() -> None:
    global GATE
    CALLS.clear()
    EVENTS.clear()
    BROKEN.clear()
    GATE = None


def _record(event: dict[str, Any]) -> None:
    CALLS[event["id"]].append(current_attempt())
    EVENTS[event["id"]] = event


@flow
def record_flow(event: dict[str, Any] | None = None) -> None:
    assert event is not None
    _record(event)


@flow
async def async_record_flow(event: dict[str, Any] | None = None) -> None:
    assert event is not None
    await asyncio.sleep(0)
    _record(event)


@flow
def flaky_flow(event: dict[str, Any] | None = None) -> None:
    """Fails until the attempt named by ``payload["succeed_on"]``."""
    assert event is not None
    _record(event)
    attempt = current_attempt() or 1
    if attempt < event["payload"]["succeed_on"]:
        raise RuntimeError(f"flaky failure on attempt {attempt}")


@flow
def breakable_flow(event: dict[str, Any] | None = None) -> None:
    assert event is not None
    _record(event)
    if event["id"] in BROKEN:
        raise ValueError(f"{event['id']} is broken")


@flow
async def gated_flow(event: dict[str, Any] | None = None) -> None:
    """Records the call, then waits for ``GATE`` (if set) before finishing."""
    assert event is not None
    _record(event)
    if GATE is not None:
        await GATE.wait()
