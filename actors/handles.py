"""The small interface through which actors call each other.

Each actor class takes its peers as handles. Tests pass the peer objects themselves (the
in-process implementation: a plain async object already satisfies the protocol); the control
plane passes Ray-backed handles (``cluster/handles.py``) that translate actor failures into
:class:`actors.errors.Unavailable` and run outcomes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from actors.clocks.base import Rejection
from actors.event import Event


@dataclass(slots=True)
class RunOutcome:
    """What a worker reports for one attempt of one event."""

    ok: bool
    error: str | None = None
    traceback: str | None = None
    prefect_flow_run_id: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunOutcome:
        return cls(**d)


@dataclass(slots=True)
class SourceRejection:
    """A rejection travelling from a host (or the ingress) to the coordinator."""

    tenant: str
    flow: str
    source: str
    rejection: Rejection


class CoordinatorHandle(Protocol):
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        """Claim events durably; one outcome per event: ``accepted``, ``duplicate``,
        ``throttled`` (quota: not stored, retry later) or ``rejected:<reason>``.
        Raises :class:`actors.errors.Unavailable` when the coordinator cannot be reached."""


class WorkerHandle(Protocol):
    async def run(self, event: dict[str, Any], attempt: int, series: int = 0) -> RunOutcome:
        """Run the event's flow once (attempt ``attempt`` of replay series ``series``).
        Idempotent per ``(event key, series, attempt)``. Worker death is a failed outcome."""


class PingHandle(Protocol):
    """What the supervisor watches: anything with a heartbeat that can be restarted."""

    name: str

    async def ping(self, timeout: float) -> dict[str, Any]:
        """Heartbeat; raises :class:`actors.errors.Unavailable` when dead or hung."""

    async def restart(self) -> None:
        """Kill and let the runtime start it again (its state comes back from the ledger)."""
