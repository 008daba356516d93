"""One root exception for the project, with a subtree per area."""

from __future__ import annotations


class ListenerError(Exception):
    """Root of every error raised by listener-cluster."""


class EventError(ListenerError):
    """An event (or a request carrying one) is malformed; ``reason`` is a short counter key."""

    def __init__(self, message: str, reason: str = "malformed", status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class UnknownFlowError(EventError):
    def __init__(self, tenant: str, flow: str) -> None:
        super().__init__(f"unknown flow {tenant}/{flow}", reason="unknown_flow", status=404)


class ClockError(ListenerError):
    """A clock could not be built or has failed."""


class SourceUnavailable(ClockError):
    """The external source cannot be reached right now; the clock retries with backoff."""


class LedgerError(ListenerError):
    """The ledger refused an operation."""


class Unavailable(ListenerError):
    """A peer actor cannot be reached right now (restarting, dead); retry later."""


class FlowLoadError(ListenerError):
    """A flow entrypoint could not be imported or is not a Prefect flow."""
