"""Run one Prefect flow with one event, tracked in a Prefect API or untracked.

``FlowRunner(flow, event_parameter, tracking, max_threads)`` wraps one loaded ``@flow``;
``await runner.run(event, attempt)`` runs it once and returns a :class:`RunOutcome`. It never
raises for a failing flow, and it never returns (or pickles) the flow's result.

- The flow receives the event dict, unchanged, in its ``event_parameter`` parameter. The
  parameter is checked when the runner is built (:func:`check_event_parameter`, which the
  config layer can call too).
- **Attempt number.** The event carries no extra keys. Flow code reads the attempt (1 for
  the first run) with :func:`current_attempt` and the event with :func:`current_event`;
  both are contextvars set for the duration of the run and ``None`` outside the cluster.
  Tracked runs also carry an ``attempt:<n>`` tag, and from the second attempt on the run
  name ends in ``-try<n>``.
- Sync flows run in a bounded thread pool (``max_threads``, or a ``pool`` shared by every
  runner of a worker); async flows are awaited on the caller's loop. Many runs can be in
  flight at once.
- ``tracking="api"``: a real Prefect flow run against ``api_url`` (default:
  ``PREFECT_API_URL`` from the environment, read when the runner is built) with tags
  ``tenant:<t>``, ``flow:<f>``, ``event:<id>``, ``attempt:<n>`` and the name
  ``<flow>-<event id>`` (long ids are shortened), unless the flow sets its own
  ``flow_run_name``. The run is created already named and tagged, so it costs no more API
  calls than calling the flow directly (:mod:`actors.prefect_runs`). The flow-run id is
  taken from the returned state.
- ``tracking="off"``: ``flow.fn(**{event_parameter: event})``, no Prefect API at all. A
  flow body that needs one (calls a ``@task``, the client, ``get_run_logger``) fails with a
  message that says to configure ``prefect: embedded`` or a server URL; the runner never
  lets Prefect start its ephemeral "temporary server".

Prefect settings are applied per run through a ``SettingsContext`` (not by mutating the
process): flow-run heartbeats are off (``flows.heartbeat_frequency=None``; with them on,
every sync flow run stalls ~1 s joining the heartbeat thread; the cluster's ledger, not
Prefect, detects crashed runs), ephemeral servers are disabled, and ``api.url`` is the
runner's (``None`` when untracked, so "off" means no API even if the environment names one).
The process is not touched; :func:`disable_ephemeral_server_for_process` is an optional
backstop for a worker process. Tracked runs share API clients (:class:`PrefectClients`: one
sync client, and one async client per event loop) instead of building one per run (~20 ms of
setup each); a worker passes one ``PrefectClients`` to all of its runners, so it holds one
client per API, whatever the number of flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.errors import FlowLoadError, ListenerError
from actors.handles import RunOutcome  # ok, error, traceback, prefect_flow_run_id, started/finished
from actors.prefect_runs import (
    PrefectClients,
    cache_server_storage_reads,
    flow_run_id_of,
    flush_prefect_services,
    run_named_async,
    run_named_sync,
    state_exception,
    state_exception_sync,
)

__all__ = [
    "FlowRunner",
    "PrefectClients",
    "RunOutcome",
    "check_event_parameter",
    "current_attempt",
    "current_event",
    "disable_ephemeral_server_for_process",
    "flush_prefect_services",
]

TRACKING_MODES = ("off", "api")
RUN_NAME_ID_CHARS = 48
NEEDS_API_HINT = "set `prefect: embedded` or a server URL in the cluster config"

_attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "listener_attempt", default=None
)
_event: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "listener_event", default=None
)


def current_attempt() -> int | None:
    """The attempt number (1, 2, ...) of the run in progress; ``None`` outside the cluster."""
    return _attempt.get()


def current_event() -> dict[str, Any] | None:
    """The event of the run in progress; ``None`` outside the cluster."""
    return _event.get()


def check_event_parameter(flow: Any, event_parameter: str) -> None:
    """Raise :class:`FlowLoadError` unless ``flow`` can be called with just the event."""
    name = getattr(flow, "name", None) or getattr(flow, "__name__", repr(flow))
    fn = getattr(flow, "fn", flow)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise FlowLoadError(f"flow {name!r}: cannot read its signature: {exc}") from None
    param = params.get(event_parameter)
    if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        available = ", ".join(p for p in params if not p.startswith("*")) or "none"
        raise FlowLoadError(
            f"flow {name!r} has no parameter {event_parameter!r} to receive the event "
            f"(its parameters: {available}); add one or set `event_parameter`"
        )
    required = [
        p.name
        for p in params.values()
        if p.name != event_parameter
        and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise FlowLoadError(
            f"flow {name!r} has required parameters {required} besides {event_parameter!r}; "
            "the cluster passes only the event, so give them defaults"
        )


def shorten_id(event_id: str, limit: int = RUN_NAME_ID_CHARS) -> str:
    """Keep head and tail of a long id (tails hold times, etags, counters)."""
    if len(event_id) <= limit:
        return event_id
    head = (limit - 1) // 2
    return f"{event_id[:head]}…{event_id[-(limit - 1 - head) :]}"


def run_name_for(event: dict[str, Any], attempt: int, flow_name: str) -> str:
    name = f"{event.get('flow') or flow_name}-{shorten_id(str(event.get('id', '')))}"
    return name if attempt <= 1 else f"{name}-try{attempt}"


def run_tags_for(event: dict[str, Any], attempt: int, flow_name: str) -> list[str]:
    return [
        f"tenant:{event.get('tenant', 'default')}",
        f"flow:{event.get('flow') or flow_name}",
        f"event:{event.get('id', '')}",
        f"attempt:{attempt}",
    ]


def disable_ephemeral_server_for_process() -> None:
    """Stop anything in this process, outside runner scopes, from starting a temporary server.

    Runs are already scoped (see the module docstring); a worker process may call this once
    at start as a backstop. It sets ``PREFECT_SERVER_EPHEMERAL_ENABLED=false`` and refreshes
    Prefect's process-global settings from the environment.
    """
    import prefect.context

    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    if prefect.context.GLOBAL_SETTINGS_CONTEXT.settings.server.ephemeral.enabled:
        prefect.context.refresh_global_settings_context()


def _needs_api_error(exc: BaseException) -> bool:
    """Did Prefect fail because the flow body needs an API (or a run context)?"""
    from prefect.exceptions import MissingContextError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MissingContextError) or "No Prefect API URL" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _describe(exc: BaseException) -> tuple[str, str]:
    text = str(exc)
    error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return error, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class FlowRunner:
    """Runs one Prefect flow object, once per ``run(event, attempt)`` call.

    ``pool`` and ``clients``, when given, are shared with other runners (a worker's) and are
    not closed by :meth:`aclose`; otherwise the runner makes and owns its own.
    """

    def __init__(
        self,
        flow: Any,
        event_parameter: str = "event",
        tracking: str = "off",
        max_threads: int = 8,
        api_url: str | None = None,
        *,
        pool: ThreadPoolExecutor | None = None,
        clients: PrefectClients | None = None,
    ) -> None:
        from prefect import Flow

        if not isinstance(flow, Flow):
            raise FlowLoadError(f"{flow!r} is a {type(flow).__name__}, not a Prefect @flow")
        if tracking not in TRACKING_MODES:
            raise ListenerError(f"tracking must be one of {TRACKING_MODES}, not {tracking!r}")
        check_event_parameter(flow, event_parameter)
        self.flow = flow
        self.name: str = flow.name
        self.event_parameter = event_parameter
        self.tracking = tracking
        self.is_async: bool = bool(flow.isasync)
        self.api_url = self._resolve_api_url(api_url) if tracking == "api" else None
        if tracking == "api":
            cache_server_storage_reads()
        self._settings = self._build_settings()
        self._owns_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(max_threads, thread_name_prefix=f"flow-{self.name}")
        self._owns_clients = clients is None
        self.clients = clients or PrefectClients()

    @staticmethod
    def _resolve_api_url(api_url: str | None) -> str:
        from prefect.settings import get_current_settings

        url = api_url or os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
        if not url:
            raise ListenerError(
                "tracking='api' needs a Prefect API: set PREFECT_API_URL or pass api_url"
            )
        return url

    def _build_settings(self) -> Any:
        """A SettingsContext template; each run enters a cheap copy of it."""
        from prefect.context import SettingsContext, get_settings_context

        base = get_settings_context()
        settings = base.settings.copy_with_update(
            updates={
                "flows.heartbeat_frequency": None,
                "server.ephemeral.enabled": False,
                "api.url": self.api_url,
            }
        )
        return SettingsContext(profile=base.profile, settings=settings)

    @contextlib.contextmanager
    def _scope(self, event: dict[str, Any], attempt: int) -> Iterator[None]:
        """Prefect settings, tags and our contextvars for one run (in the current context)."""
        from prefect import tags

        tokens = [
            (_attempt, _attempt.set(attempt)),
            (_event, _event.set(event)),
        ]
        try:
            with self._settings.model_copy():
                if self.tracking == "api":
                    with tags(*run_tags_for(event, attempt, self.name)):
                        yield
                else:
                    yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    def _tracked_call(
        self, event: dict[str, Any], attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        """The flow's arguments and the run's name (``None``: the flow names its own runs)."""
        name = None if self.flow.flow_run_name else run_name_for(event, attempt, self.name)
        return {self.event_parameter: event}, name

    async def run(self, event: dict[str, Any], attempt: int) -> RunOutcome:
        """Run the flow once with ``event``; every failure becomes ``ok=False``."""
        if self.is_async:
            return await self._run_async(event, attempt)
        ctx = contextvars.copy_context()
        future = self._pool.submit(ctx.run, self._run_sync, event, attempt)
        return await asyncio.wrap_future(future)

    def _run_sync(self, event: dict[str, Any], attempt: int) -> RunOutcome:
        started = time.time()
        flow_run_id: str | None = None
        try:
            with self._scope(event, attempt):
                started = time.time()
                if self.tracking == "off":
                    self.flow.fn(**{self.event_parameter: event})
                    return self._outcome(started)
                with self.clients.sync_context():
                    kwargs, name = self._tracked_call(event, attempt)
                    state = run_named_sync(self.flow, kwargs, name)
                    flow_run_id = flow_run_id_of(state)
                    if state.is_completed():
                        return self._outcome(started, flow_run_id=flow_run_id)
                    return self._failed(state_exception_sync(state), started, flow_run_id)
        except BaseException as exc:  # a thread has no one to re-raise to
            return self._failed(exc, started, flow_run_id)

    async def _run_async(self, event: dict[str, Any], attempt: int) -> RunOutcome:
        started = time.time()
        flow_run_id: str | None = None
        try:
            with self._scope(event, attempt):
                started = time.time()
                if self.tracking == "off":
                    await self.flow.fn(**{self.event_parameter: event})
                    return self._outcome(started)
                async with await self.clients.async_context():
                    kwargs, name = self._tracked_call(event, attempt)
                    state = await run_named_async(self.flow, kwargs, name)
                    flow_run_id = flow_run_id_of(state)
                    if state.is_completed():
                        return self._outcome(started, flow_run_id=flow_run_id)
                    return self._failed(await state_exception(state), started, flow_run_id)
        except (Exception, SystemExit) as exc:
            return self._failed(exc, started, flow_run_id)

    def _outcome(
        self,
        started: float,
        error: str | None = None,
        tb: str | None = None,
        flow_run_id: str | None = None,
    ) -> RunOutcome:
        return RunOutcome(
            ok=error is None,
            error=error,
            traceback=tb,
            prefect_flow_run_id=flow_run_id,
            started_at=started,
            finished_at=time.time(),
        )

    def _failed(self, exc: BaseException, started: float, flow_run_id: str | None) -> RunOutcome:
        error, tb = _describe(exc)
        if self.tracking == "off" and _needs_api_error(exc):
            error = f"flow {self.name!r} needs a Prefect API (it calls tasks or the client); "
            error += NEEDS_API_HINT
        return self._outcome(started, error, tb, flow_run_id)

    async def aclose(self, flush_timeout: float = 10.0) -> None:
        """Stop the pool (running sync flows finish in the background) and close clients,
        unless they are shared (their owner closes them).

        Tracked runs' logs and events are sent in the background in batches: flush them
        here, while the server still runs, or interpreter exit waits on them with retries.
        """
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_clients:  # shared clients: their owner flushes and closes
            if self.tracking == "api":
                await flush_prefect_services(flush_timeout)
            await self.clients.aclose()
