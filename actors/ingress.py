"""HTTP ingress: webhooks and ``listeners emit`` in, control requests for the CLI.

``POST /v1/events/{tenant}/{flow}`` answers 202 only after the coordinator has the event in the
ledger (200 for a duplicate). When the coordinator is restarting the answer is 503 with
Retry-After, never a hang and never a silently dropped event. The control routes
(``/v1/status``, ``/v1/runs``, ``/v1/dlq``, pause/resume) need the cluster's admin token, which
``listeners up`` writes into the state dir for the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from actors.clocks.base import Rejection
from actors.errors import EventError, Unavailable
from actors.event import Event, body_hash, parse_ingress_body, utcnow_iso
from actors.group_commit import GroupCommit
from actors.handles import CoordinatorHandle, SourceRejection

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER = 2  # seconds a client is asked to wait while workers catch up
MAX_OPEN_REQUESTS = 2048


class ControlHandle(Protocol):
    """The cluster's control surface (the supervisor implements it)."""

    async def status(self) -> dict[str, Any]: ...
    async def runs(
        self, tenant: str | None, flow: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def pause(self, tenant: str, flow: str) -> None: ...
    async def resume(self, tenant: str, flow: str) -> None: ...
    async def replay(self, event_ids: list[str] | None) -> list[str]: ...
    async def latencies(self, clear: bool) -> list[float]: ...


@dataclass(slots=True)
class TenantAuth:
    name: str
    token: str | None  # None: unauthenticated requests from loopback only


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class Ingress:
    def __init__(
        self,
        flows: list[tuple[str, str]],
        tenants: list[TenantAuth],
        coordinator: CoordinatorHandle,
        control: ControlHandle,
        *,
        admin_token: str,
        host: str = "127.0.0.1",
        port: int = 8787,
        max_payload_bytes: int = 1024 * 1024,
    ) -> None:
        self.flows = set(flows)
        self.tenants = {t.name: t for t in tenants}
        self.coordinator = coordinator
        # Concurrent POSTs share one coordinator call: alone at low load, a batch of all the
        # requests that arrived meanwhile at high load (one call in flight at a time).
        self._submit = GroupCommit(self._submit_many)
        self.control = control
        self.admin_token = admin_token
        self.host, self.port = host, port
        self.max_payload_bytes = max_payload_bytes
        self.counters: dict[str, int] = {}
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=self._routes())

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/health", self._health, methods=["GET"]),
            Route("/v1/events/{tenant}/{flow}", self._post_event, methods=["POST"]),
            Route("/v1/status", self._admin(self._status), methods=["GET"]),
            Route("/v1/runs", self._admin(self._runs), methods=["GET"]),
            Route("/v1/dlq", self._admin(self._dlq), methods=["GET"]),
            Route("/v1/dlq/replay", self._admin(self._replay), methods=["POST"]),
            Route("/v1/latencies", self._admin(self._latencies), methods=["GET"]),
            Route("/v1/flows/{tenant}/{flow}/{action}", self._admin(self._flow), methods=["POST"]),
        ]

    # -- server -------------------------------------------------------------------------
    async def start(self) -> int:
        """Serve on the actor's loop; returns the bound port (``port: 0`` picks a free one)."""
        if self._server is not None and self._server.started:
            return self.port
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # Bounded memory under a flood: past this many open requests (each up to
            # ``max_payload_bytes``) uvicorn answers 503 at once instead of reading more.
            limit_concurrency=MAX_OPEN_REQUESTS,
        )
        server = _QuietServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve())
        while not server.started:
            if self._task.done():
                exc = self._task.exception()
                raise OSError(f"ingress could not bind {self.host}:{self.port}: {exc}")
            await asyncio.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
            self._server = None

    async def ping(self) -> dict[str, Any]:
        return {
            "name": "ingress",
            "time": time.time(),
            "pid": os.getpid(),
            "port": self.port,
            **self.counters,
        }

    # -- events -------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def _post_event(self, request: Request) -> Response:
        tenant, flow = request.path_params["tenant"], request.path_params["flow"]
        if (tenant, flow) not in self.flows:
            self._count("unknown_flow")
            return _error(404, f"unknown flow {tenant}/{flow}")
        try:
            body = await self._read_body(request)
            denied = self._authorize(request, tenant, body)
            if denied is not None:
                self._count("unauthorized")
                return denied
            event_id, payload = parse_ingress_body(body, self.max_payload_bytes)
        except EventError as exc:
            await self._reject(tenant, flow, exc)
            return _error(exc.status, str(exc))
        event = Event(
            id=event_id or body_hash(payload),
            tenant=tenant,
            flow=flow,
            source="webhook",
            type="webhook",
            occurred=utcnow_iso(),
            payload=payload,
            received=time.time(),
        )
        try:
            outcome = await self._submit(event)
        except Unavailable as exc:
            return _error(503, f"coordinator unavailable, retry: {exc}", **{"Retry-After": "1"})
        return self._answer(event.id, outcome)

    async def _submit_many(self, events: list[Event]) -> list[str]:
        return await self.coordinator.submit(events)

    def _answer(self, event_id: str, outcome: str) -> Response:
        self._count(outcome)
        if outcome == "accepted":
            return JSONResponse({"id": event_id, "status": "accepted"}, status_code=202)
        if outcome == "duplicate":
            return JSONResponse({"id": event_id, "status": "duplicate"}, status_code=200)
        if outcome == "throttled":
            return _error(429, "tenant is over its events-per-second quota", **{"Retry-After": "1"})
        if outcome == "busy":
            return _error(
                429,
                "tenant's backlog of events waiting for a worker is full (max_pending_runs); "
                "retry later",
                **{"Retry-After": str(BUSY_RETRY_AFTER)},
            )
        return _error(404 if outcome == "rejected:unknown_flow" else 400, outcome)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_payload_bytes:
            raise EventError(
                f"body is {declared} bytes, the limit is {self.max_payload_bytes}",
                reason="too_large",
                status=413,
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_payload_bytes:
                raise EventError(
                    f"body exceeds the limit of {self.max_payload_bytes} bytes",
                    reason="too_large",
                    status=413,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _authorize(self, request: Request, tenant: str, body: bytes) -> Response | None:
        if self._bearer(request) == self.admin_token:
            return None
        auth = self.tenants.get(tenant)
        token = auth.token if auth else None
        if token is None:
            if _is_loopback(request.client.host if request.client else None):
                return None
            return _error(403, f"tenant {tenant} has no token: only loopback requests accepted")
        bearer = self._bearer(request)
        if bearer is not None and hmac.compare_digest(bearer, token):
            return None
        signature = request.headers.get("x-signature", "")
        if signature.startswith("sha256="):
            expected = hmac.new(token.encode(), body, hashlib.sha256).hexdigest()
            if hmac.compare_digest(signature.removeprefix("sha256="), expected):
                return None
            return _error(401, "bad X-Signature")
        return _error(401, "missing or bad credentials (Bearer token or X-Signature)")

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else None

    async def _reject(self, tenant: str, flow: str, exc: EventError) -> None:
        self._count(f"rejected:{exc.reason}")
        rejection = SourceRejection(tenant, flow, "webhook", Rejection(exc.reason, str(exc)))
        try:
            await self.coordinator.submit([], [rejection])
        except Exception as err:  # counting must never turn a 4xx into a 5xx
            log.warning("could not record rejection for %s/%s: %s", tenant, flow, err)

    # -- control ------------------------------------------------------------------------
    def _admin(
        self, handler: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            bearer = self._bearer(request)
            if bearer is None or not hmac.compare_digest(bearer, self.admin_token):
                return _error(401, "control requests need the cluster's admin token")
            try:
                return JSONResponse(await handler(request))
            except Unavailable as exc:
                return _error(503, f"cluster busy, retry: {exc}", **{"Retry-After": "1"})
            except KeyError as exc:
                return _error(404, str(exc.args[0]) if exc.args else "not found")
            except ValueError as exc:  # a bad body or query (JSONDecodeError is one)
                return _error(400, f"bad request: {exc}")

        return guarded

    async def _status(self, request: Request) -> Any:
        return await self.control.status()

    async def _runs(self, request: Request) -> Any:
        q = request.query_params
        runs = await self.control.runs(
            q.get("tenant"), q.get("flow"), q.get("state"), int(q.get("limit", "1000"))
        )
        return {"runs": runs}

    async def _dlq(self, request: Request) -> Any:
        dead = await self.control.runs(None, None, "dead", 100_000)
        return {"dead": dead}

    async def _replay(self, request: Request) -> Any:
        body = await request.body()
        doc = json.loads(body) if body.strip() else {}  # no body: replay every dead letter
        if not isinstance(doc, dict):
            raise ValueError('body must be a JSON object like {"ids": [...]}')
        return {"replayed": await self.control.replay(doc.get("ids") or None)}

    async def _latencies(self, request: Request) -> Any:
        clear = request.query_params.get("clear") == "1"
        return {"latencies": await self.control.latencies(clear)}

    async def _flow(self, request: Request) -> Any:
        p = request.path_params
        if p["action"] not in ("pause", "resume"):
            raise KeyError(f"unknown action {p['action']}")
        await getattr(self.control, p["action"])(p["tenant"], p["flow"])
        return {"tenant": p["tenant"], "flow": p["flow"], "action": p["action"]}


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: the hosting process (a Ray actor) owns signals."""

    def install_signal_handlers(self) -> None:
        return None

    def capture_signals(self):  # type: ignore[no-untyped-def]
        import contextlib

        return contextlib.nullcontext()
