"""Ray-backed implementations of the handle interface in ``actors/handles.py``.

Actor failures become :class:`actors.errors.Unavailable` (so callers retry or answer 503);
a worker dying mid-run becomes a failed :class:`RunOutcome` (so the attempt is retried).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.errors import Unavailable
from actors.event import Event, pack_events
from actors.handles import RunOutcome, SourceRejection

ACTOR_DOWN = (RayActorError, ActorUnavailableError, GetTimeoutError, asyncio.TimeoutError)


class RayHandle:
    """An async proxy for one named actor: ``await h.method(*args)`` calls it remotely."""

    def __init__(self, name: str, actor: Any, timeout: float | None = None) -> None:
        self.name = name
        self.actor = actor
        self.timeout = timeout

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        limit = timeout if timeout is not None else self.timeout
        try:
            if limit is None:
                return await ref
            return await asyncio.wait_for(ref, limit)
        except ACTOR_DOWN as exc:
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        async def remote(*args: Any) -> Any:
            return await self.call(method, *args)

        return remote

    async def ping(self, timeout: float) -> dict[str, Any]:
        return await self.call("ping", timeout=timeout)

    async def restart(self) -> None:
        ray.kill(self.actor, no_restart=False)


class RayCoordinatorHandle(RayHandle):
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        return await self.call("submit_packed", pack_events(events), rejections or [])


class RayWorkerHandle(RayHandle):
    async def run(self, event: dict[str, Any], attempt: int) -> RunOutcome:
        try:
            return await self.call("run", event, attempt)
        except Unavailable as exc:
            return RunOutcome(ok=False, error=f"worker died during the run: {exc}")
