"""Prefect glue for tracked runs: shared API clients and a flow-run engine that creates each
run already named.

**Named at creation.** Calling a ``@flow`` (``flow(...)``, Prefect's ``run_flow``) creates the
flow run unnamed and, when the flow has a ``flow_run_name``, renames it right after: one
``PATCH /flow_runs/{id}`` more per run, plus one more ``GET /admin/storage`` for the result
store of the context the name is resolved in. Handing a pre-created run to ``run_flow``
(as Prefect's runner does for deployments) costs a ``PATCH`` too (the engine updates the
run's version and retry policy). :func:`run_named_sync` / :func:`run_named_async` run the
flow in Prefect's own engine, changed in one place: its ``create_flow_run`` passes the
cluster's run name to the one ``POST /flow_runs/`` it makes. Tags come from the ``tags()``
context, as for any flow call. A flow with its own ``flow_run_name`` (and a subflow) keeps
Prefect's path: its name needs the run context to resolve.

Measured with a trivial flow against a loopback Prefect 3.9.1 server (HTTP requests per
run, batched log uploads aside): a bare ``flow()`` call 8 (``POST /flows/``,
``POST /flow_runs/``, ``GET /flow_runs/{id}``, 2 ``set_state``, 2 ``GET /admin/storage``,
1 ``GET /csrf-token`` from the new client every call makes); the cluster before this
module 9 (the rename: ``PATCH`` and a third ``GET /admin/storage``; no csrf: its client is
shared); with it 7.

**Shared clients.** :class:`PrefectClients`: one sync client per API URL and one async
client per (API URL, event loop), instead of one per run (~20 ms of setup and a csrf-token
request each).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from typing import Any

__all__ = [
    "PrefectClients",
    "flow_run_id_of",
    "flush_prefect_services",
    "run_named_async",
    "run_named_sync",
    "state_exception",
    "state_exception_sync",
]


class PrefectClients:
    """Prefect API clients shared by tracked runs: one sync client per API URL (thread-safe;
    sync flows in the pool share it) and one async client per (API URL, event loop).

    A client is opened on first use, inside the run's settings scope, so it talks to that
    run's API. :meth:`aclose` closes them all.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: dict[str, Any] = {}
        self._async: dict[tuple[str, asyncio.AbstractEventLoop], asyncio.Task[Any]] = {}

    @staticmethod
    def _url() -> str:
        from prefect.settings import get_current_settings

        return str(get_current_settings().api.url)

    def sync_context(self) -> Any:
        """A client context over the shared sync client of the current settings' API."""
        from prefect.client.orchestration import get_client
        from prefect.context import SyncClientContext

        url = self._url()
        with self._lock:
            client = self._sync.get(url)
            if client is None:
                client = get_client(sync_client=True)
                client.__enter__()
                self._sync[url] = client
        return SyncClientContext.model_construct(client=client)

    async def async_context(self) -> Any:
        """A client context over this loop's shared async client of the current API."""
        from prefect.client.orchestration import get_client
        from prefect.context import AsyncClientContext

        key = (self._url(), asyncio.get_running_loop())
        opening = self._async.get(key)
        if opening is None:  # one client per loop, even when runs start together
            opening = self._async[key] = asyncio.create_task(get_client().__aenter__())
        try:
            return AsyncClientContext.model_construct(client=await opening)
        except Exception:
            self._async.pop(key, None)  # try a new client next time
            raise

    def opened(self) -> list[Any]:
        """The clients opened so far."""
        ready = [t for t in self._async.values() if t.done() and not t.cancelled()]
        return [*self._sync.values(), *(t.result() for t in ready if t.exception() is None)]

    async def aclose(self) -> None:
        with self._lock:
            sync, self._sync = list(self._sync.values()), {}
        for client in sync:
            await asyncio.to_thread(client.__exit__, None, None, None)
        loop = asyncio.get_running_loop()
        for key in [k for k in self._async if k[1] is loop]:
            opening = self._async.pop(key)
            with contextlib.suppress(Exception):
                await (await opening).__aexit__(None, None, None)


@functools.cache
def _named_engines() -> tuple[type[Any], type[Any]]:
    """Prefect's sync and async flow-run engines, creating the run with ``run_name``."""
    from dataclasses import dataclass

    from prefect.context import FlowRunContext, TagsContext
    from prefect.flow_engine import AsyncFlowRunEngine, FlowRunEngine
    from prefect.states import Pending

    def create_args(engine: Any) -> dict[str, Any]:
        # What Prefect's own create_flow_run passes for a top-level run, plus the name.
        return {
            "flow": engine.flow,
            "name": engine.run_name,
            "parameters": engine.flow.serialize_parameters(engine.parameters or {}),
            "state": Pending(),
            "tags": TagsContext.get().current_tags,
        }

    def own_path(engine: Any) -> bool:
        return engine.run_name is None or FlowRunContext.get() is not None

    @dataclass
    class NamedFlowRunEngine(FlowRunEngine):  # type: ignore[type-arg]
        run_name: str | None = None

        def create_flow_run(self, client: Any) -> Any:
            if own_path(self):
                return super().create_flow_run(client)
            return client.create_flow_run(**create_args(self))

    @dataclass
    class NamedAsyncFlowRunEngine(AsyncFlowRunEngine):  # type: ignore[type-arg]
        run_name: str | None = None

        async def create_flow_run(self, client: Any) -> Any:
            if own_path(self):
                return await super().create_flow_run(client)
            return await client.create_flow_run(**create_args(self))

    return NamedFlowRunEngine, NamedAsyncFlowRunEngine


def _parameters(flow: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The parameters ``flow(**kwargs)`` would run with (defaults applied)."""
    from prefect.utilities.callables import get_call_parameters

    return get_call_parameters(flow.fn, (), kwargs)


def run_named_sync(flow: Any, kwargs: dict[str, Any], run_name: str | None) -> Any:
    """``flow(**kwargs, return_state=True)`` for a sync flow, its run created as ``run_name``
    (``None``: Prefect names it). Returns the final state."""
    if flow.isgenerator:  # Prefect's path (which refuses return_state for generators)
        return flow(**kwargs, return_state=True)
    engine_cls = _named_engines()[0]
    engine = engine_cls(flow=flow, parameters=_parameters(flow, kwargs), run_name=run_name)
    with engine.start():  # the loop of prefect.flow_engine.run_flow_sync
        while engine.is_running():
            with engine.run_context():
                engine.call_flow_fn()
    return engine.state


async def run_named_async(flow: Any, kwargs: dict[str, Any], run_name: str | None) -> Any:
    """The async counterpart of :func:`run_named_sync`."""
    if flow.isgenerator:
        return await flow(**kwargs, return_state=True)
    engine_cls = _named_engines()[1]
    engine = engine_cls(flow=flow, parameters=_parameters(flow, kwargs), run_name=run_name)
    async with engine.start():  # the loop of prefect.flow_engine.run_flow_async
        while engine.is_running():
            async with engine.run_context():
                await engine.call_flow_fn()
    return engine.state


async def flush_prefect_services(timeout: float) -> None:
    """Send what Prefect's log and event workers hold (they restart on next use)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            drained = service.drain_all(timeout=timeout, at_exit=False)
            if inspect.isawaitable(drained):
                await drained


def flow_run_id_of(state: Any) -> str | None:
    run_id = getattr(getattr(state, "state_details", None), "flow_run_id", None)
    return str(run_id) if run_id else None


def state_exception_sync(state: Any) -> BaseException:
    from prefect.states import get_state_exception

    try:
        return get_state_exception(state)
    except Exception as exc:  # e.g. a state with no exception attached
        return RuntimeError(f"flow run ended {state.type.value}: {state.message or exc}")


async def state_exception(state: Any) -> BaseException:
    return await asyncio.to_thread(state_exception_sync, state)
