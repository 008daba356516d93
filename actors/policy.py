"""Per-flow and per-tenant policies the coordinator enforces (built from the config)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.batching import BatchPolicy

FlowKey = tuple[str, str]


@dataclass(slots=True)
class FlowPolicy:
    tenant: str
    flow: str
    retries: int = 3
    retry_delay: float = 1.0
    max_retry_delay: float = 300.0
    batch: BatchPolicy | None = None  # None: one run per event

    @property
    def key(self) -> FlowKey:
        return (self.tenant, self.flow)

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        """Delay before attempt ``attempt + 1``: exponential with ±50% jitter, capped."""
        base = min(self.max_retry_delay, self.retry_delay * 2 ** (attempt - 1))
        return base * (0.5 + rng())


@dataclass(slots=True)
class TenantPolicy:
    name: str
    max_concurrent_runs: int = 8
    max_events_per_second: int = 1000
    max_pending_runs: int = 100_000
