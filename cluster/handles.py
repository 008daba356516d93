"""Ray-backed implementations of the handle interface in ``actors/handles.py``.

Actor failures become :class:`actors.errors.Unavailable` (so callers retry or answer 503);
a worker dying mid-run becomes a failed :class:`RunOutcome` (so the attempt is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.claims import batches_of, in_input_order, pack_batches
from actors.errors import Unavailable
from actors.event import Event
from actors.handles import RunOutcome, SourceRejection
from actors.wire import WireCallError, WireClient, WireDown, node_identity

RELOOKUP_INTERVAL = 0.5
WIRE_RETRY_INTERVAL = 0.5  # how often a handle without a lane asks for one
log = logging.getLogger(__name__)
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
    """An async proxy for one named actor: ``await h.method(*args)`` calls it remotely.

    With a ``namespace`` (or a recipe), a call that finds the actor gone looks its name up
    again: when Ray gave up on the actor and the supervisor created a new one under the same
    name, every copy of this handle (in hosts, the ingress, ...) follows it.

    Methods in ``wire_methods`` take the actor's fast lane (``actors/wire.py``) when it is on
    this node; whenever the lane is missing, broken or the method raised there, the same call
    goes through Ray, so failures look exactly as they do without the lane.
    """

    wire_methods: frozenset[str] = frozenset()

    def __init__(
        self,
        name: str,
        actor: Any,
        timeout: float | None = None,
        recipe: ActorRecipe | None = None,
        namespace: str | None = None,
    ) -> None:
        self.name = name
        self.actor = actor
        self.timeout = timeout
        self.recipe = recipe
        self.namespace = namespace or (recipe.namespace if recipe else None)
        self._looked_up = 0.0
        self._wire: WireClient | None = None
        self._wire_asked = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_wire"], state["_wire_asked"] = None, 0.0  # a lane belongs to one process
        return state

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        limit = timeout if timeout is not None else self.timeout
        if method in self.wire_methods:
            lane = await self._lane()
            if lane is not None:
                try:
                    if limit is None:
                        return await lane.call(method, *args)
                    return await asyncio.wait_for(lane.call(method, *args), limit)
                except (WireDown, WireCallError) as exc:
                    log.debug("%s.%s off the lane (%s): through Ray", self.name, method, exc)
                except TimeoutError:
                    raise Unavailable(f"{self.name}: no answer in {limit} s") from None
        try:
            return await self._call(method, args, limit)
        except ACTOR_DOWN as exc:
            if not self._follow_rename():
                raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
        try:  # the name now belongs to a new actor: one more try, at it
            return await self._call(method, args, limit)
        except ACTOR_DOWN as exc:
            raise Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None

    async def _call(self, method: str, args: tuple[Any, ...], limit: float | None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        if limit is None:
            return await ref
        return await asyncio.wait_for(ref, limit)

    async def _lane(self) -> WireClient | None:
        """The actor's fast lane, asked for at most every ``WIRE_RETRY_INTERVAL`` seconds
        while there is none (first call, actor restarted, another node)."""
        lane = self._wire
        if lane is not None and not lane.broken and lane.usable_here():
            return lane
        if lane is not None:
            lane.close()
            self._wire = None
        now = time.monotonic()
        if now - self._wire_asked < WIRE_RETRY_INTERVAL:
            return None
        self._wire_asked = now
        try:
            where = await self._call("wire_endpoint", (), 10.0)
        except Exception as exc:  # an older actor, or one that is down: Ray it is
            log.debug("%s has no fast lane: %s", self.name, exc)
            return None
        if where.get("node") != node_identity():
            return None
        self._wire = WireClient(where["host"], where["port"], where["token"])
        return self._wire

    def _follow_rename(self) -> bool:
        """Point at the actor now registered under our name, if it is a different one
        (looked up at most every ``RELOOKUP_INTERVAL`` seconds while the actor is down)."""
        now = time.monotonic()
        if self.namespace is None or now - self._looked_up < RELOOKUP_INTERVAL:
            return False
        self._looked_up = now
        try:
            current = ray.get_actor(self.name, namespace=self.namespace)
        except Exception:
            return False
        if current._actor_id == self.actor._actor_id:
            return False
        self.actor = current
        return True

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
    wire_methods = frozenset({"submit_packed"})

    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        batches, order = batches_of(events)
        outcomes = await self.call("submit_packed", pack_batches(batches), rejections or [])
        return in_input_order(outcomes, order)


class RayWorkerHandle(RayHandle):
    wire_methods = frozenset({"run"})

    async def run(self, event: dict[str, Any], attempt: int, series: int = 0) -> RunOutcome:
        try:
            outcome = await self.call("run", event, attempt, series)
        except Unavailable as exc:
            return RunOutcome(ok=False, error=f"worker died during the run: {exc}")
        return RunOutcome.from_dict(outcome) if isinstance(outcome, dict) else outcome
