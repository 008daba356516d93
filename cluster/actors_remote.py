"""The data-plane classes as Ray actors: constructors that take only picklable arguments.

Each class here only adapts construction (opening the ledger inside the actor process,
starting the HTTP server on restart); behaviour lives in ``actors/``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from pathlib import Path
from typing import Any

import ray

from actors.clocks import ClockSpec
from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.handles import CoordinatorHandle, PingHandle
from actors.host import ListenerHost
from actors.ingress import ControlHandle, Ingress, TenantAuth
from actors.ledger import open_ledger
from actors.supervisor import ClockHostHandle, Supervisor
from actors.worker import TRACKED_CONCURRENCY, FlowTarget, FlowWorker


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _freeze_heap() -> None:
    """Everything loaded so far (Ray's worker, our modules, their libraries) lives as long as
    the process: out of the cyclic collector's reach, whose full collections would walk it
    again and again (~120 ms each with Prefect imported, on a slow 2-core machine: a stall
    of every request in flight). Measured in the coordinator during ingest: GC 16% of submit
    time, 6% frozen; 170k -> 200k events/s."""
    gc.collect()
    gc.freeze()


class CoordinatorActor(Coordinator):
    def __init__(
        self,
        ledger_url: str,
        state_dir: str,
        synchronous: str,
        workers: list[Any],
        flows: list[FlowPolicy],
        tenants: list[TenantPolicy],
        worker_concurrency: int,
    ) -> None:
        _logging()
        ledger = open_ledger(ledger_url, Path(state_dir), synchronous)
        super().__init__(ledger, workers, flows, tenants, worker_concurrency=worker_concurrency)
        _freeze_heap()

    async def stop(self, drain_timeout: float = 30.0) -> int:
        """Stop as the coordinator does, then close the ledger's connection (a PostgreSQL or
        Redis ledger holds one open; it would reopen if called again)."""
        still_running = await super().stop(drain_timeout)
        await self.ledger.close()
        return still_running


class HostActor(ListenerHost):
    def __init__(
        self,
        host_id: str,
        specs: list[ClockSpec],
        state_dir: str,
        coordinator: CoordinatorHandle,
        env: dict[str, str] | None = None,
    ) -> None:
        _logging()
        # Source credentials arrive as an argument, not a runtime_env: a runtime_env makes Ray
        # start a dedicated process instead of taking a ready one (+0.4 s per host restart).
        os.environ.update(env or {})
        super().__init__(host_id, list(specs), Path(state_dir), coordinator)
        # A host Ray restarted after a crash listens again at once instead of waiting for the
        # supervisor's next heartbeat (``start`` is idempotent; the async actor's loop is
        # already running here). A first start keeps the deploy order: workers, coordinators,
        # then hosts.
        self._autostart = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._autostart = asyncio.get_running_loop().create_task(self.start())


class WorkerActor(FlowWorker):
    def __init__(
        self,
        index: int,
        targets: list[FlowTarget],
        tracking: str,
        threads: int,
        state_dir: str | None = None,
        tracked_concurrency: int = TRACKED_CONCURRENCY,
    ) -> None:
        _logging()
        journal = Path(state_dir) / "workers" / f"worker-{index}.journal" if state_dir else None
        super().__init__(
            index,
            targets,
            tracking=tracking,
            max_threads=threads,
            journal=journal,
            tracked_concurrency=tracked_concurrency,
            freeze_gc=True,  # as each flow is loaded
        )


class IngressActor(Ingress):
    def __init__(
        self,
        flows: list[tuple[str, str]],
        tenants: list[TenantAuth],
        coordinator: CoordinatorHandle,
        control: ControlHandle,
        options: dict[str, Any],
    ) -> None:
        _logging()
        super().__init__(flows, tenants, coordinator, control, **options)
        _freeze_heap()

    async def ping(self) -> dict[str, Any]:
        await self.start()  # a restarted ingress binds its port again
        return await super().ping()


class SupervisorActor(Supervisor):
    def __init__(
        self,
        coordinator: Any,
        hosts: list[ClockHostHandle],
        others: list[PingHandle],
        host_specs: dict[str, list[ClockSpec]],
        interval: float,
    ) -> None:
        _logging()
        super().__init__(coordinator, hosts, others, host_specs, interval=interval)
        _freeze_heap()
