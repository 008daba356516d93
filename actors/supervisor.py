"""Supervisor: PIN 14's Lazarus, done as supervision.

Every ``interval`` seconds it pings each actor (hosts, coordinator, workers, ingress) with a
timeout. A target that fails ``misses_allowed`` pings in a row, dead or alive-but-hung, is
restarted through its handle, with exponential backoff between restarts of the same target.
Restarted actors rebuild themselves (hosts from their clock specs and cursors, the coordinator
from the ledger). A host that cannot be brought back has its clocks re-homed on the live host
with the fewest clocks. The supervisor also answers the control plane: per-flow state
(listening / paused / failed) joined from host heartbeats and the coordinator's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.clocks import ClockSpec
from actors.errors import Unavailable
from actors.handles import PingHandle

log = logging.getLogger(__name__)


class ClockHostHandle(PingHandle, Protocol):
    async def add_clocks(self, specs: list[ClockSpec]) -> None: ...

    async def clocks(self) -> list[dict[str, Any]]: ...


#: how long ``status`` waits for a host's clock list (10k clocks take well under a second)
CLOCKS_TIMEOUT = 5.0


@dataclass(slots=True)
class Watch:
    target: PingHandle
    misses: int = 0
    restarts: int = 0
    next_restart_at: float = 0.0
    last_ok: float = field(default_factory=time.time)
    last_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    clocks: list[dict[str, Any]] = field(default_factory=list)  # a host's, as of the last status


class Supervisor:
    def __init__(
        self,
        coordinator: Any,
        hosts: list[ClockHostHandle],
        others: list[PingHandle],
        host_specs: dict[str, list[ClockSpec]],
        *,
        interval: float = 2.0,
        ping_timeout: float = 10.0,
        misses_allowed: int = 2,
        rehome_after_restarts: int = 5,
    ) -> None:
        self.coordinator = coordinator
        self.hosts = {h.name: h for h in hosts}
        self.host_specs = host_specs
        self.interval = interval
        self.ping_timeout = ping_timeout
        self.misses_allowed = misses_allowed
        self.rehome_after_restarts = rehome_after_restarts
        # A sharded coordinator is watched shard by shard: each restarts on its own.
        shards = getattr(coordinator, "shards", [coordinator])
        self._watches = {t.name: Watch(t) for t in [*shards, *hosts, *others]}
        self._task: asyncio.Task[None] | None = None

    async def watch(self, target: PingHandle) -> None:
        """Add a target (e.g. the ingress, created after the supervisor)."""
        self._watches.setdefault(target.name, Watch(target))

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def ping(self) -> dict[str, Any]:
        await self.start()
        return {"name": "supervisor", "time": time.time(), "pid": os.getpid()}

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)

    async def check_once(self) -> None:
        """One round of heartbeats and, where due, restarts (tests call this directly)."""
        await asyncio.gather(*(self._check(w) for w in self._watches.values()))

    async def _check(self, w: Watch) -> None:
        try:
            w.info = await w.target.ping(self.ping_timeout)
            w.misses, w.last_ok, w.last_error = 0, time.time(), None
            return
        except Unavailable as exc:
            w.misses += 1
            w.last_error = str(exc)
        except Exception as exc:
            w.misses += 1
            w.last_error = f"{type(exc).__name__}: {exc}"
        now = time.time()
        if w.misses < self.misses_allowed or now < w.next_restart_at:
            return
        w.restarts += 1
        w.next_restart_at = now + min(60.0, self.interval * 2**w.restarts)
        log.warning(
            "%s missed %d heartbeats (%s): restarting", w.target.name, w.misses, w.last_error
        )
        try:
            await w.target.restart()
        except Exception as exc:
            log.error("restart of %s failed: %s", w.target.name, exc)
        if w.target.name in self.hosts and w.restarts >= self.rehome_after_restarts:
            await self._rehome(w.target.name)

    async def _rehome(self, dead: str) -> None:
        specs = self.host_specs.pop(dead, [])
        live = [n for n in self.hosts if n != dead and self._watches[n].misses == 0]
        if not specs or not live:
            self.host_specs.setdefault(dead, specs)
            return
        target = min(live, key=lambda n: len(self.host_specs.get(n, [])))
        try:
            await self.hosts[target].add_clocks(specs)
        except Exception as exc:  # keep the clocks where they were; retry on the next restart
            self.host_specs.setdefault(dead, specs)
            log.error("re-homing clocks of %s on %s failed: %s", dead, target, exc)
            return
        self.host_specs.setdefault(target, []).extend(specs)
        log.warning("re-homed %d clocks of %s on %s", len(specs), dead, target)

    # -- control surface ----------------------------------------------------------------
    def clocks(self) -> list[dict[str, Any]]:
        """Every host's clocks as last fetched (heartbeats carry only per-state counts)."""
        out: list[dict[str, Any]] = []
        for name in self.hosts:
            out.extend(self._watches[name].clocks)
        return out

    def actors(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "alive": w.misses == 0,
                "restarts": w.restarts,
                "last_ok": w.last_ok,
                "error": w.last_error,
            }
            for name, w in self._watches.items()
        ]

    async def _refresh_hosts(self) -> None:
        """Fresh clock states for ``status`` (a host that does not answer keeps its last)."""

        async def one(name: str) -> None:
            w = self._watches[name]
            with contextlib.suppress(Exception):
                w.clocks = await asyncio.wait_for(self.hosts[name].clocks(), CLOCKS_TIMEOUT)

        await asyncio.gather(*(one(n) for n in self.hosts))

    async def status(self) -> dict[str, Any]:
        await self.start()
        base, _ = await asyncio.gather(self.coordinator.status(), self._refresh_hosts())
        by_flow: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in self.clocks():
            by_flow.setdefault((c["tenant"], c["flow"]), []).append(
                {k: c[k] for k in ("name", "type", "state", "error", "events")}
            )
        now = time.time()
        for f in base["flows"]:
            mine = by_flow.get((f["tenant"], f["flow"]), [])
            f["clocks"] = mine
            if f.pop("paused"):
                f["state"] = "paused"
            elif any(c["state"] == "failed" for c in mine):
                f["state"] = "failed"
            else:
                f["state"] = "listening"
            last = f.get("last_event_at")
            f["last_event_age"] = None if last is None else round(now - last, 3)
        base["actors"] = self.actors()
        return base

    async def runs(
        self, tenant: str | None, flow: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self.coordinator.runs(tenant, flow, state, limit)

    async def pause(self, tenant: str, flow: str) -> None:
        await self.coordinator.pause(tenant, flow)

    async def resume(self, tenant: str, flow: str) -> None:
        await self.coordinator.resume(tenant, flow)

    async def replay(self, event_ids: list[str] | None) -> list[str]:
        return await self.coordinator.replay(event_ids)

    async def latencies(self, clear: bool) -> list[float]:
        return await self.coordinator.latencies(clear)
