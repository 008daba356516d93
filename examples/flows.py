"""Example Prefect flows for the configs in ``configs/`` and the demo.

Each flow takes the event in its ``event`` parameter (SPEC section 3); called outside the cluster
it gets its default, ``None``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(log_prints=True)
def ingest(event: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the event and return a small summary of it."""
    if event is None:
        print("ingest called without an event")
        return {"id": None, "source": None}
    print(f"ingest {event.get('id')} from {event.get('source')}: {event.get('payload')!r}")
    return {"id": event.get("id"), "source": event.get("source")}


@flow(log_prints=True)
def nightly(event: dict[str, Any] | None = None) -> str | None:
    """A time-clock flow: print the scheduled tick and return its event id."""
    print(f"nightly tick: {event.get('occurred') if event else 'manual run'}")
    return event.get("id") if event else None
