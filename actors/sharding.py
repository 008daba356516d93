"""Coordinator shards: flows are split across coordinators by a stable hash of (tenant, flow).

Each shard owns its flows outright (their ledger rows, queues, retries and quotas), so shards
never talk to each other and the exactly-once claim stays a single-writer decision per flow.
:class:`CoordinatorShards` is the router the rest of the data plane talks to: it satisfies the
coordinator interface (``submit`` plus the control calls) by splitting batches per shard and
merging the answers, so a host, the ingress or the supervisor does not know how many shards
there are. With one shard it is a pass-through.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

from actors.event import Event
from actors.handles import SourceRejection

MAX_REMEMBERED = 100_000  # flows whose shard a router remembers (cleared when full)


def shard_of(tenant: str, flow: str, shards: int) -> int:
    """The shard that owns ``tenant/flow``: CRC-32 of the pair, stable across processes and
    Python versions (``hash()`` is salted per process, so it cannot be used)."""
    if shards <= 1:
        return 0
    return zlib.crc32(f"{tenant}\x00{flow}".encode()) % shards


def split_share(total: int, part: int, whole: int) -> int:
    """A shard's share of a tenant-wide limit: proportional to how many of the tenant's
    flows it owns, at least 1 (a tenant limit of 8 over flows on two shards: 4 + 4)."""
    if whole <= 0 or part >= whole:
        return total
    return max(1, round(total * part / whole))


class CoordinatorShards:
    """Routes coordinator calls to the shard that owns each flow; fans out the rest."""

    def __init__(self, shards: Sequence[Any]) -> None:
        if not shards:
            raise ValueError("at least one coordinator shard is needed")
        self.shards = list(shards)
        self._owners: dict[tuple[str, str], int] = {}  # flow → shard, remembered

    def _owner(self, tenant: str, flow: str) -> int:
        key = (tenant, flow)
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) >= MAX_REMEMBERED:
                self._owners.clear()
            owner = self._owners[key] = shard_of(tenant, flow, len(self.shards))
        return owner

    def shard(self, tenant: str, flow: str) -> Any:
        return self.shards[self._owner(tenant, flow)]

    # -- intake -------------------------------------------------------------------------
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        """One call per shard that has something, concurrently; outcomes in input order.
        A shard that is down raises ``Unavailable`` for the whole batch: the caller resends
        it, and the shards that did answer only report duplicates the second time."""
        n = len(self.shards)
        if n == 1:
            return await self.shards[0].submit(events, rejections or [])
        positions: list[list[int]] = [[] for _ in range(n)]
        owner = self._owner
        for i, ev in enumerate(events):
            positions[owner(ev.tenant, ev.flow)].append(i)
        rejected: list[list[SourceRejection]] = [[] for _ in range(n)]
        for r in rejections or []:
            rejected[owner(r.tenant, r.flow)].append(r)
        busy = [s for s in range(n) if positions[s] or rejected[s]]
        answers = await asyncio.gather(
            *(self.shards[s].submit([events[i] for i in positions[s]], rejected[s]) for s in busy)
        )
        outcomes = [""] * len(events)
        for s, answer in zip(busy, answers, strict=True):
            for i, outcome in zip(positions[s], answer, strict=True):
                outcomes[i] = outcome
        return outcomes

    # -- control ------------------------------------------------------------------------
    async def _all(self, method: str, *args: Any) -> list[Any]:
        return await asyncio.gather(*(getattr(s, method)(*args) for s in self.shards))

    async def status(self) -> dict[str, Any]:
        parts = await self._all("status")
        flows = [f for part in parts for f in part["flows"]]
        flows.sort(key=lambda f: (f["tenant"], f["flow"]))
        ledgers = [part.get("ledger", {"ok": True}) for part in parts]
        ledger: dict[str, Any] = {
            "ok": all(lg["ok"] for lg in ledgers),
            "outages": sum(lg.get("outages", 0) for lg in ledgers),
        }
        errors = [f"shard {i}: {lg['error']}" for i, lg in enumerate(ledgers) if "error" in lg]
        if errors:
            ledger["error"] = "; ".join(errors)
        return {"flows": flows, "shards": len(self.shards), "ledger": ledger}

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        if tenant is not None and flow is not None:
            return await self.shard(tenant, flow).runs(tenant, flow, state, limit)
        parts = await self._all("runs", tenant, flow, state, limit)
        merged = [r for part in parts for r in part]
        merged.sort(key=lambda r: (-(r.get("created") or 0.0), r["event_id"]))
        return merged[:limit]  # newest first, as one ledger answers

    async def pause(self, tenant: str, flow: str) -> None:
        await self.shard(tenant, flow).pause(tenant, flow)

    async def resume(self, tenant: str, flow: str) -> None:
        await self.shard(tenant, flow).resume(tenant, flow)

    async def replay(self, event_ids: list[str] | None = None) -> list[str]:
        parts = await self._all("replay", event_ids)
        return [key for part in parts for key in part]

    async def latencies(self, clear: bool = False) -> list[float]:
        parts = await self._all("latencies", clear)
        return [v for part in parts for v in part]

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``RayHandle.call``-style access (the driver's ``LocalCluster.call``). A method the
        router does not merge (``ping``, ...) goes to the only shard, if there is one."""
        if hasattr(type(self), method):
            coro = getattr(self, method)(*args)
        elif len(self.shards) == 1:
            shard = self.shards[0]
            remote = getattr(shard, "call", None)  # a Ray handle: call the actor's method
            coro = remote(method, *args) if remote else getattr(shard, method)(*args)
        else:
            raise AttributeError(f"{method!r} is per shard: call one of the coordinator shards")
        return await (coro if timeout is None else asyncio.wait_for(coro, timeout))
