"""Ray-backed implementations of the handle interface in ``actors/handles.py``.

Actor failures become :class:`actors.errors.Unavailable` (so callers retry or answer 503);
a worker dying mid-run becomes a failed :class:`RunOutcome` (so the attempt is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.errors import Unavailable
from actors.event import Event, pack_events
from actors.handles import RunOutcome, SourceRejection

ACTOR_DOWN = (RayActorError, ActorUnavailableError, GetTimeoutError, asyncio.TimeoutError)


@dataclass
class ActorRecipe:
    """How to create a named actor again once Ray has given up on it (killed for good)."""

    cls: type
    name: str
    namespace: str
    options: dict[str, Any]
    args: tuple[Any, ...]

    def spawn(self) -> Any:
        return (
            ray.remote(self.cls)
            .options(name=self.name, namespace=self.namespace, **self.options)
            .remote(*self.args)
        )

    def exists(self) -> bool:
        try:
            ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return False
        return True


class RayHandle:
    """An async proxy for one named actor: ``await h.method(*args)`` calls it remotely."""

    def __init__(
        self,
        name: str,
        actor: Any,
        timeout: float | None = None,
        recipe: ActorRecipe | None = None,
    ) -> None:
        self.name = name
        self.actor = actor
        self.timeout = timeout
        self.recipe = recipe

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
        """Kill and let Ray restart it; if Ray has given up on it, create it anew."""
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=False)
        if self.recipe is not None and not self.recipe.exists():
            self.actor = self.recipe.spawn()


class RayCoordinatorHandle(RayHandle):
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        return await self.call("submit_packed", pack_events(events), rejections or [])


class RayWorkerHandle(RayHandle):
    async def run(self, event: dict[str, Any], attempt: int, series: int = 0) -> RunOutcome:
        try:
            return await self.call("run", event, attempt, series)
        except Unavailable as exc:
            return RunOutcome(ok=False, error=f"worker died during the run: {exc}")
