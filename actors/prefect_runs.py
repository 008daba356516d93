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

**Server storage read once.** Prefect asks the server for its default result storage
(``GET /admin/storage``) twice a run, for the run's result store and its persist-result
default. :func:`cache_server_storage_reads` makes a worker ask once per ``STORAGE_TTL``
seconds and API URL instead (a failed read is not remembered: Prefect's fallback, local
storage, applies to that run and the next run asks again). A default storage changed on the
server reaches runs within ``STORAGE_TTL``.

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
import time
from typing import Any

import httpx

__all__ = [
    "STORAGE_TTL",
    "PrefectClients",
    "cache_server_storage_reads",
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


STORAGE_TTL = 5.0
# The server's default result storage block id by API URL, with when it was read.
_STORAGE_IDS: dict[str, tuple[float, Any]] = {}
# What Prefect's own reads catch (its PrefectHTTPStatusError is an httpx.HTTPStatusError).
_STORAGE_READ_ERRORS = (httpx.HTTPError, RuntimeError, ValueError)


def _remembered_storage(url: str) -> tuple[bool, Any]:
    hit = _STORAGE_IDS.get(url)
    if hit is not None and time.monotonic() - hit[0] < STORAGE_TTL:
        return True, hit[1]
    return False, None


def _remember_storage(url: str, config: Any) -> Any:
    _STORAGE_IDS[url] = (time.monotonic(), config.default_result_storage_block_id)
    return config.default_result_storage_block_id


def _read_storage_id_sync() -> Any:
    """Prefect's ``_read_server_default_result_storage_block_id``, remembered a while."""
    from prefect.client.orchestration import get_client

    url = PrefectClients._url()
    known, block_id = _remembered_storage(url)
    if known:
        return block_id
    try:
        config = get_client(sync_client=True).read_server_default_result_storage()
    except _STORAGE_READ_ERRORS:
        return None  # as Prefect: local storage for this run; the next run asks again
    return _remember_storage(url, config)


async def _read_storage_id_async() -> Any:
    """The async counterpart of :func:`_read_storage_id_sync`."""
    from prefect.client.orchestration import get_client

    url = PrefectClients._url()
    known, block_id = _remembered_storage(url)
    if known:
        return block_id
    try:
        config = await get_client().read_server_default_result_storage()
    except _STORAGE_READ_ERRORS:
        return None
    return _remember_storage(url, config)


@functools.cache
def cache_server_storage_reads() -> bool:
    """Route Prefect's reads of the server's default result storage through the remembered
    reads above (for this process). False if this Prefect has no such reads to route."""
    from prefect import results

    names = (
        "_read_server_default_result_storage_block_id",
        "_aread_server_default_result_storage_block_id",
    )
    if not all(hasattr(results, name) for name in names):
        return False  # another Prefect: its own reads, uncached
    setattr(results, names[0], _read_storage_id_sync)
    setattr(results, names[1], _read_storage_id_async)
    return True


# Flow ids by (API URL, flow name): Prefect's create_flow_run upserts the flow (a
# ``POST /flows/``, one of a run's four writes) before every run; a worker does it once per
# flow and server, and again only if the server no longer knows the id.
_FLOW_IDS: dict[tuple[str, str], Any] = {}


def _flow_gone(exc: httpx.HTTPStatusError) -> bool:
    """A run create refused because its flow id is unknown (the flow was deleted)."""
    return exc.response.status_code in (404, 409, 422)


def _run_create_body(flow_id: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Prefect's ``create_flow_run`` request body, for a flow whose id is known already."""
    from prefect.client.schemas.actions import FlowRunCreate
    from prefect.client.schemas.objects import FlowRunPolicy
    from prefect.states import to_state_create

    flow = args["flow"]
    return FlowRunCreate(
        flow_id=flow_id,
        flow_version=flow.version,
        name=args["name"],
        parameters=args["parameters"],
        context={},
        tags=list(args["tags"] or []),
        state=to_state_create(args["state"]),
        empirical_policy=FlowRunPolicy(
            retries=flow.retries, retry_delay=int(flow.retry_delay_seconds or 0)
        ),
    ).model_dump(mode="json", exclude_unset=True)


def _created_run(response: Any, args: dict[str, Any]) -> Any:
    from prefect.client.schemas.objects import FlowRun

    run = FlowRun.model_validate(response.json())
    run.parameters = args["parameters"]  # as Prefect does: the local Python objects
    return run


def _create_sync(client: Any, args: dict[str, Any]) -> Any:
    """Create the flow run: with the flow's known id in one ``POST /flow_runs/``, else by
    Prefect's ``create_flow_run`` (which upserts the flow first), remembering the id."""
    key = (str(client.api_url), args["flow"].name)
    flow_id = _FLOW_IDS.get(key)
    if flow_id is not None:
        body = _run_create_body(flow_id, args)
        try:
            return _created_run(client.request("POST", "/flow_runs/", json=body), args)
        except httpx.HTTPStatusError as exc:
            if not _flow_gone(exc):
                raise
            _FLOW_IDS.pop(key, None)
    run = client.create_flow_run(**args)
    _FLOW_IDS[key] = run.flow_id
    return run


async def _create_async(client: Any, args: dict[str, Any]) -> Any:
    """The async counterpart of :func:`_create_sync`."""
    key = (str(client.api_url), args["flow"].name)
    flow_id = _FLOW_IDS.get(key)
    if flow_id is not None:
        body = _run_create_body(flow_id, args)
        try:
            return _created_run(await client.request("POST", "/flow_runs/", json=body), args)
        except httpx.HTTPStatusError as exc:
            if not _flow_gone(exc):
                raise
            _FLOW_IDS.pop(key, None)
    run = await client.create_flow_run(**args)
    _FLOW_IDS[key] = run.flow_id
    return run


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
            return _create_sync(client, create_args(self))

    @dataclass
    class NamedAsyncFlowRunEngine(AsyncFlowRunEngine):  # type: ignore[type-arg]
        run_name: str | None = None

        async def create_flow_run(self, client: Any) -> Any:
            if own_path(self):
                return await super().create_flow_run(client)
            return await _create_async(client, create_args(self))

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
