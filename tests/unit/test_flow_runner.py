"""FlowRunner without a Prefect API (tracking="off"): calls, errors, concurrency."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

from actors.errors import FlowLoadError, ListenerError
from actors.flow_runner import (
    FlowRunner,
    PrefectClients,
    check_event_parameter,
    current_attempt,
    current_event,
    run_name_for,
    run_tags_for,
    shorten_id,
)
from tests import flows_for_tests as flows
from tests.unit.helpers import peak_overlap


def make_event(**over: Any) -> dict[str, Any]:
    event = {
        "id": f"ev-{uuid.uuid4().hex[:10]}",
        "tenant": "acme",
        "flow": "ingest",
        "source": "test",
        "type": "test",
        "occurred": "2024-01-01T00:00:00+00:00",
        "payload": {"n": 1},
    }
    event.update(over)
    return event


@pytest.fixture
async def runner_factory() -> AsyncIterator[Callable[..., FlowRunner]]:
    made: list[FlowRunner] = []

    def make(flow: Any, **kwargs: Any) -> FlowRunner:
        runner = FlowRunner(flow, **kwargs)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        await runner.aclose()


@pytest.mark.parametrize("flow", [flows.sync_flow, flows.async_flow])
async def test_event_reaches_flow_with_attempt(runner_factory, flow) -> None:
    runner = runner_factory(flow)
    event = make_event()
    before = time.time()
    outcome = await runner.run(event, attempt=3)
    assert outcome.ok, outcome.error
    assert outcome.error is None and outcome.traceback is None
    assert outcome.prefect_flow_run_id is None
    assert before <= outcome.started_at <= outcome.finished_at <= time.time()
    seen = flows.SEEN[event["id"]]
    assert seen["event"] == event  # the whole event, unchanged, no extra keys
    assert seen["attempt"] == 3
    assert current_attempt() is None and current_event() is None  # reset after the run


async def test_sync_flows_run_in_the_pool_async_on_the_loop(runner_factory) -> None:
    sync_runner = runner_factory(flows.sync_flow)
    async_runner = runner_factory(flows.async_flow)
    assert not sync_runner.is_async and async_runner.is_async
    event = make_event()
    assert (await sync_runner.run(event, 1)).ok
    assert flows.SEEN[event["id"]]["thread"].startswith("flow-sync-flow")


async def test_custom_event_parameter(runner_factory) -> None:
    runner = runner_factory(flows.custom_param_flow, event_parameter="record")
    event = make_event()
    assert (await runner.run(event, 1)).ok
    assert flows.SEEN[event["id"]]["event"] == event
    assert flows.SEEN[event["id"]]["scale"] == 2


def test_missing_event_parameter_is_a_clear_load_error() -> None:
    with pytest.raises(FlowLoadError, match=r"no parameter 'event'.*parameters: x"):
        FlowRunner(flows.no_event_flow)
    with pytest.raises(FlowLoadError, match="no parameter 'payload'"):
        check_event_parameter(flows.sync_flow, "payload")
    with pytest.raises(FlowLoadError, match=r"required parameters \['other'\]"):
        check_event_parameter(flows.needs_more_flow, "event")
    check_event_parameter(flows.custom_param_flow, "record")


def test_bad_arguments() -> None:
    with pytest.raises(FlowLoadError, match="not a Prefect @flow"):
        FlowRunner(flows.sync_flow.fn)
    with pytest.raises(ListenerError, match="tracking must be one of"):
        FlowRunner(flows.sync_flow, tracking="loud")


@pytest.mark.parametrize(
    ("flow", "error", "where"),
    [
        (flows.failing_flow, "ValueError: boom for ", "failing_flow"),
        (flows.async_failing_flow, "KeyError: 'missing'", "async_failing_flow"),
    ],
)
async def test_raising_flow_gives_error_and_traceback(runner_factory, flow, error, where) -> None:
    outcome = await runner_factory(flow).run(make_event(), 2)
    assert not outcome.ok
    assert outcome.error is not None and outcome.error.startswith(error)
    assert outcome.traceback is not None
    assert "Traceback (most recent call last)" in outcome.traceback
    assert where in outcome.traceback
    assert outcome.started_at <= outcome.finished_at


async def test_unpicklable_result_is_not_a_problem(runner_factory) -> None:
    outcome = await runner_factory(flows.unpicklable_result_flow).run(make_event(), 1)
    assert outcome.ok, outcome.error


async def test_sync_runs_are_concurrent_and_bounded_by_the_pool(runner_factory) -> None:
    runner = runner_factory(flows.sleepy_flow, max_threads=4)
    events = [make_event(payload={"sleep": 0.3}) for _ in range(12)]
    outcomes = await asyncio.gather(*(runner.run(e, 1) for e in events))
    assert all(o.ok for o in outcomes)
    threads = {flows.SEEN[e["id"]]["thread"] for e in events}
    assert 1 < len(threads) <= 4
    # Runs overlap (concurrent), but never more than the pool's 4 at once.
    assert 1 < peak_overlap(outcomes) <= 4


async def test_async_runs_overlap_on_the_loop(runner_factory) -> None:
    runner = runner_factory(flows.async_flow)
    outcomes = await asyncio.gather(*(runner.run(make_event(), 1) for _ in range(50)))
    assert all(o.ok for o in outcomes)


async def test_tasks_without_api_fail_clearly_without_a_temporary_server(runner_factory) -> None:
    # Even with ephemeral mode allowed by the caller's settings and an API URL around,
    # "off" means no API: the task must fail fast with the configuration hint.
    with temporary_settings(
        updates={PREFECT_SERVER_EPHEMERAL_ENABLED: True, PREFECT_API_URL: "http://127.0.0.1:9/api"}
    ):
        runner = runner_factory(flows.task_flow)
    outcome = await runner.run(make_event(), 1)
    assert not outcome.ok  # a temporary server would have let the task succeed
    assert outcome.error == (
        "flow 'task-flow' needs a Prefect API (it calls tasks or the client); "
        "set `prefect: embedded` or a server URL in the cluster config"
    )
    assert outcome.traceback is not None and "No Prefect API URL" in outcome.traceback


def test_tracking_api_needs_an_api_url(monkeypatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with (
        temporary_settings(updates={PREFECT_API_URL: None}),
        pytest.raises(ListenerError, match="needs a Prefect API"),
    ):
        FlowRunner(flows.sync_flow, tracking="api")


def test_run_names_and_tags() -> None:
    event = make_event(id="s3://landing/incoming/" + "x" * 80 + "@etag-123")
    name = run_name_for(event, 1, "ignored")
    assert name.startswith("ingest-s3://landing/") and name.endswith("@etag-123")
    assert len(name) == len("ingest-") + 48 and "…" in name
    assert run_name_for(event, 2, "ignored").endswith("-try2")
    assert shorten_id("short") == "short"
    assert run_tags_for(event, 2, "ignored") == [
        "tenant:acme",
        "flow:ingest",
        f"event:{event['id']}",
        "attempt:2",
    ]


def test_disable_ephemeral_server_for_process_backstop() -> None:
    # Process-global settings: check it in a child process so this one is untouched.
    code = (
        "from prefect.settings import get_current_settings as s\n"
        "from actors.flow_runner import disable_ephemeral_server_for_process as d\n"
        "assert s().server.ephemeral.enabled\n"
        "d()\n"
        "assert not s().server.ephemeral.enabled\n"
    )
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


async def test_runners_sharing_a_pool_are_bounded_together(runner_factory) -> None:
    pool = ThreadPoolExecutor(2, thread_name_prefix="shared")
    try:
        one = runner_factory(flows.sleepy_flow, max_threads=8, pool=pool)
        two = runner_factory(flows.sleepy_flow, max_threads=8, pool=pool)
        events = [make_event(payload={"sleep": 0.2}) for _ in range(8)]
        runs = [(one if i % 2 else two).run(e, 1) for i, e in enumerate(events)]
        outcomes = await asyncio.gather(*runs)
        assert all(o.ok for o in outcomes)
        assert {flows.SEEN[e["id"]]["thread"].split("_")[0] for e in events} == {"shared"}
        assert 1 < peak_overlap(outcomes) <= 2  # both runners together, not 2 each
        await one.aclose()  # a runner does not shut a pool it does not own
        assert (await two.run(make_event(payload={"sleep": 0}), 1)).ok
    finally:
        pool.shutdown(wait=True)


async def test_prefect_clients_one_per_api_and_loop() -> None:
    from prefect.settings import temporary_settings as settings

    clients = PrefectClients()
    with settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        first, second = clients.sync_context(), clients.sync_context()
        assert first.client is second.client
        contexts = await asyncio.gather(*(clients.async_context() for _ in range(5)))
        assert len({id(c.client) for c in contexts}) == 1
    with settings(updates={PREFECT_API_URL: "http://127.0.0.1:10/api"}):
        other = clients.sync_context()
        assert other.client is not first.client
        assert str(other.client.api_url).startswith("http://127.0.0.1:10/")
    assert len(clients.opened()) == 3  # two sync (one per API), one async
    await clients.aclose()
    assert clients.opened() == []


async def test_tracked_runners_share_the_given_clients(runner_factory) -> None:
    shared = PrefectClients()
    api = "http://127.0.0.1:9/api"
    one = runner_factory(flows.sync_flow, tracking="api", api_url=api, clients=shared)
    two = runner_factory(flows.async_flow, tracking="api", api_url=api, clients=shared)
    assert one.clients is shared and two.clients is shared
    alone = runner_factory(flows.sync_flow, tracking="api", api_url=api)
    assert alone.clients is not shared
    with alone._settings.model_copy():
        shared.sync_context()
    await one.aclose()  # shared clients stay open for the other runners
    assert len(shared.opened()) == 1
    await shared.aclose()
