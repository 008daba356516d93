"""How the CLI reaches a cluster: HTTP to the live ingress, or the state dir when it is down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from actors.errors import ListenerError
from actors.ledger import FlowCounts, Ledger, open_written_shards
from cluster.config import ClusterConfig
from cluster.runtime import pid_alive, read_state


class ClusterDown(ListenerError):
    """No live cluster answers for this state dir."""


class Client:
    def __init__(self, config: ClusterConfig, timeout: float = 30.0) -> None:
        self.config = config
        self.state = read_state(config.state_path) or {}
        self.timeout = timeout

    @property
    def live(self) -> bool:
        s = self.state
        return s.get("state") == "listening" and pid_alive(int(s.get("pid", 0)))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not self.live:
            raise ClusterDown(f"no cluster is running from {self.config.state_path}")
        headers = {"Authorization": f"Bearer {self.state['admin_token']}"}
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                r = httpx.request(
                    method,
                    self.state["ingress_url"] + path,
                    headers=headers,
                    timeout=self.timeout,
                    **kwargs,
                )
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise ClusterDown(f"cluster ingress does not answer: {exc}") from None
                time.sleep(0.5)
                continue
            if r.status_code == 503 and time.monotonic() < deadline:
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            return r

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._request(method, path, **kwargs)
        if r.status_code >= 400:
            raise ListenerError(f"{method} {path}: HTTP {r.status_code}: {_message(r)}")
        return r.json()

    # -- commands -----------------------------------------------------------------------
    def emit(self, tenant: str, flow: str, payload: Any, event_id: str | None) -> httpx.Response:
        body: dict[str, Any] = {"payload": payload}
        if event_id is not None:
            body["id"] = event_id
        return self._request("POST", f"/v1/events/{tenant}/{flow}", json=body)

    def pause(self, tenant: str, flow: str, action: str) -> Any:
        return self._json("POST", f"/v1/flows/{tenant}/{flow}/{action}")

    def replay(self, ids: list[str]) -> list[str]:
        return self._json("POST", "/v1/dlq/replay", json={"ids": ids})["replayed"]

    def status(self) -> dict[str, Any]:
        if self.live:
            return self._json("GET", "/v1/status")
        return asyncio.run(self._offline_status())

    def runs(self, flow: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        tenant, name = self._split(flow)
        if self.live:
            params = {k: v for k, v in (("tenant", tenant), ("flow", name), ("state", state)) if v}
            return self._json("GET", "/v1/runs", params=params)["runs"]
        return asyncio.run(self._offline_runs(tenant, name, state))

    def dead(self) -> list[dict[str, Any]]:
        return self.runs(state="dead")

    def _split(self, flow: str | None) -> tuple[str | None, str | None]:
        if not flow:
            return None, None
        f = self.config.find_flow(flow)
        return f.tenant, f.name

    # -- offline: read the ledger in the state dir --------------------------------------
    async def _ledgers(self) -> list[Ledger]:
        """The ledger of every coordinator shard that has one (SQLite files, PostgreSQL
        schemas)."""
        c = self.config
        return await open_written_shards(c.ledger_url, c.state_path, c.cluster.coordinator_shards)

    async def _offline_runs(
        self, tenant: str | None, flow: str | None, state: str | None
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for ledger in await self._ledgers():
            try:
                rows.extend(r.to_dict() for r in await ledger.runs(tenant, flow, state, 100_000))
            finally:
                await ledger.close()
        rows.sort(key=lambda r: (-(r.get("created") or 0.0), r["event_id"]))
        return rows

    async def _offline_status(self) -> dict[str, Any]:
        counts: dict[tuple[str, str], FlowCounts] = {}
        paused: set[tuple[str, str]] = set()
        for ledger in await self._ledgers():  # shards own disjoint flows: a plain union
            try:
                counts.update(await ledger.counts())
                paused.update(await ledger.paused())
            finally:
                await ledger.close()
        flows = []
        for f in self.config.flows:
            c = counts.get((f.tenant, f.name)) or FlowCounts()
            flows.append(
                {
                    "tenant": f.tenant,
                    "flow": f.name,
                    "state": "paused" if (f.tenant, f.name) in paused else "stopped",
                    "clocks": [
                        {"name": k.name, "type": k.type, "state": "stopped", "error": None}
                        for k in f.clocks
                    ],
                    "events": c.events,
                    "rejected_by_reason": c.rejected_by_reason,
                    "runs": c.runs,
                    "last_event_at": c.last_event_at,
                    "last_event_age": time.time() - c.last_event_at if c.last_event_at else None,
                }
            )
        return {"flows": flows, "live": False}


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text
