"""FlowWorker: loads each flow once and runs it with events, many at a time.

Async flows run concurrently on the worker's event loop; sync flows run in ONE bounded thread
pool of ``max_threads`` shared by all of the worker's flows; tracked runs of all its flows
share one set of Prefect API clients (:class:`PrefectClients`).

Tracked runs are further limited to ``tracked_concurrency`` at once per worker (config key
``cluster.tracked_concurrency``, 1 by default; the rest wait their turn in the worker). A
Prefect server on SQLite (the embedded one) takes one write at a time: a run whose write
transaction loses a race with another's gets a 503 (``SQLITE_BUSY``), and Prefect's client
retries it after 2 s. More runs in flight mean more lost races: measured with a trivial sync
flow, 2 workers, 200 runs, alternating with bare Prefect (2 processes calling the flow) on
the same server, cluster/bare ratio per pass: 1 in flight per worker 0.99, 1.11,
0.99, 1.02; 2: 1.17, 1.03, 0.65, 0.71; 4: 0.78, 0.40; 8: 0.93, 0.61 (the low ones with the
machine's load at 5-11). In one process, 80 runs: 0-1 503s with 1 in flight, 3-5 with 2, 6-8
with 4, 21 with 8. The limit covers the whole run, flow body included: raise it for flows
that spend their time in their own work rather than in the Prefect API, or for a Prefect
server on PostgreSQL.

``run`` is idempotent per ``(event key, attempt)``: a coordinator that restarts re-sends the
runs it found ``running`` in the ledger, and the worker joins the attempt already in flight
(or returns its remembered outcome) instead of starting the flow a second time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.entrypoint import load_flow
from actors.flow_runner import FlowRunner
from actors.handles import RunOutcome
from actors.journal import AttemptJournal
from actors.prefect_runs import PrefectClients, flush_prefect_services
from actors.wire import WireServed

RECENT_OUTCOMES = 10_000
TRACKED_CONCURRENCY = 1  # see the module docstring


@dataclass(slots=True)
class FlowTarget:
    """What a worker needs to run one configured flow."""

    tenant: str
    flow: str
    event_parameter: str = "event"
    entrypoint: str | None = None
    base_dir: str | None = None
    flow_obj: Any = None  # a Prefect Flow given directly (the ``listen()`` API)

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.flow)


class FlowWorker(WireServed):
    WIRE_METHODS = frozenset({"run"})  # the coordinator's hot call

    def __init__(
        self,
        index: int,
        targets: list[FlowTarget],
        tracking: str = "off",
        max_threads: int = 8,
        env: dict[str, str] | None = None,
        tracked_concurrency: int = TRACKED_CONCURRENCY,
        journal: Path | None = None,
        freeze_gc: bool = False,
    ) -> None:
        os.environ.update(env or {})
        self.index = index
        # Loading a flow imports Prefect and the user's modules: ~150k objects that live as
        # long as the process. With ``freeze_gc`` they are moved out of the cyclic
        # collector's reach once loaded (a full collection walking them takes ~120 ms on a
        # slow 2-core machine, a pause every run waiting on this worker would share).
        self.freeze_gc = freeze_gc
        self.tracking = tracking
        self.max_threads = max_threads
        self._targets = {t.key: t for t in targets}
        self._runners: dict[tuple[str, str], FlowRunner] = {}
        self._pool: ThreadPoolExecutor | None = None  # made with the first runner
        self.clients = PrefectClients()
        self.tracked_concurrency = max(1, tracked_concurrency)
        self._tracked_slots = asyncio.Semaphore(self.tracked_concurrency)
        self._inflight: dict[tuple[Any, ...], asyncio.Future[RunOutcome]] = {}
        self._recent: OrderedDict[tuple[Any, ...], RunOutcome] = OrderedDict()
        self.journal = AttemptJournal(journal)
        self.runs_started = 0

    def _runner(self, tenant: str, flow: str) -> FlowRunner:
        runner = self._runners.get((tenant, flow))
        if runner is None:
            target = self._targets.get((tenant, flow))
            if target is None:
                raise LookupError(f"worker {self.index} has no flow {tenant}/{flow}")
            flow_obj = target.flow_obj
            if flow_obj is None:
                base = Path(target.base_dir) if target.base_dir else None
                flow_obj = load_flow(target.entrypoint or "", base)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.max_threads, thread_name_prefix=f"worker-{self.index}"
                )
            runner = FlowRunner(
                flow_obj,
                event_parameter=target.event_parameter,
                tracking=self.tracking,
                max_threads=self.max_threads,
                pool=self._pool,
                clients=self.clients,
            )
            self._runners[(tenant, flow)] = runner
            if self.freeze_gc:
                gc.collect()
                gc.freeze()
        return runner

    async def start(self) -> dict[str, str]:
        """Load every flow now, so the first event does not pay for imports.

        Returns the flows that failed to load, with the reason (their runs will fail with it).
        """
        failed: dict[str, str] = {}
        for tenant, flow in self._targets:
            try:
                self._runner(tenant, flow)
            except Exception as exc:
                failed[f"{tenant}/{flow}"] = f"{type(exc).__name__}: {exc}"
        return failed

    async def run(self, event: dict[str, Any], attempt: int, series: int = 0) -> RunOutcome:
        key = (event["tenant"], event["flow"], event["id"], series, attempt)
        if key in self._recent:
            return self._recent[key]
        fut = self._inflight.get(key)
        if fut is None:
            if self.journal.began_before(key):
                # Begun by an earlier incarnation of this worker, which died: never run an
                # attempt twice; the coordinator retries it as a new attempt.
                return RunOutcome(
                    ok=False,
                    error=f"worker {self.index} restarted during attempt {attempt}",
                    started_at=time.time(),
                    finished_at=time.time(),
                )
            self.journal.begin(key)
            fut = asyncio.ensure_future(self._run(event, attempt))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._remember(key, f))
        return await asyncio.shield(fut)

    def _remember(self, key: tuple[Any, ...], fut: asyncio.Future[RunOutcome]) -> None:
        self._inflight.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._recent[key] = fut.result()
            while len(self._recent) > RECENT_OUTCOMES:
                self._recent.popitem(last=False)

    async def _run(self, event: dict[str, Any], attempt: int) -> RunOutcome:
        started = time.time()
        try:
            runner = self._runner(event["tenant"], event["flow"])
        except Exception as exc:
            return RunOutcome(
                ok=False,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                started_at=started,
                finished_at=time.time(),
            )
        if self.tracking != "api":
            self.runs_started += 1
            return await runner.run(event, attempt)
        async with self._tracked_slots:
            self.runs_started += 1
            return await runner.run(event, attempt)

    async def stop(self, timeout: float = 30.0) -> None:
        """Wait for runs in flight, then flush and close every runner's Prefect clients (the
        Prefect server must still be up: logs and events are sent in background batches)."""
        await self.close_wire()
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=timeout)
        for runner in self._runners.values():
            await runner.aclose()
        self._runners.clear()
        if self.tracking == "api":
            await flush_prefect_services(10.0)
        await self.clients.aclose()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.journal.close()

    async def ping(self) -> dict[str, Any]:
        return {
            "name": f"worker-{self.index}",
            "time": time.time(),
            "pid": os.getpid(),
            "inflight": len(self._inflight),
            "runs_started": self.runs_started,
            "tracked_concurrency": self.tracked_concurrency,
        }
