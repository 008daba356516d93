"""Tracked runs: FlowRunner(tracking="api") against a real PrefectServer (one per module)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import prefect
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType

from actors.flow_runner import FlowRunner
from cluster.prefect_server import PrefectServer
from tests import flows_for_tests as flows


@pytest.fixture(scope="module")
def prefect_server(request, tmp_path_factory) -> Iterator[PrefectServer]:
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    template_dir = cache.mkdir("prefect-db-template") if cache else tmp_path_factory.mktemp("t")
    server = PrefectServer(
        tmp_path_factory.mktemp("state"),
        template_db=Path(template_dir) / f"prefect-{prefect.__version__}.db",
    )
    with server:
        yield server
    assert not server.is_running()


@pytest.fixture
def api_url(prefect_server: PrefectServer, monkeypatch) -> str:
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    return prefect_server.api_url


def make_event(**over: Any) -> dict[str, Any]:
    event = {
        "id": f"ev-{uuid.uuid4().hex[:12]}",
        "tenant": "acme",
        "flow": "ingest",
        "source": "test",
        "type": "test",
        "occurred": "2024-01-01T00:00:00+00:00",
        "payload": {"n": 1},
    }
    event.update(over)
    return event


async def read_run(api_url: str, run_id: str | None) -> Any:
    assert run_id is not None
    # A client for this server explicitly: PREFECT_API_URL set after `import prefect` is not
    # seen by get_client(), which would start a temporary server instead.
    async with PrefectClient(api_url) as client:
        return await client.read_flow_run(UUID(run_id))


def test_server_layout(prefect_server: PrefectServer) -> None:
    assert prefect_server.is_running()
    assert prefect_server.api_url == f"{prefect_server.ui_url}/api"
    assert prefect_server.db_path == prefect_server.state_dir / "prefect" / "prefect.db"
    assert prefect_server.db_path.is_file()
    assert prefect_server.log_path == prefect_server.state_dir / "logs" / "prefect-server.log"
    assert prefect_server.startup_seconds is not None


@pytest.mark.parametrize("flow", [flows.sync_flow, flows.async_flow])
async def test_tracked_run_is_on_the_server(api_url, flow) -> None:
    runner = FlowRunner(flow, tracking="api")
    assert runner.api_url == api_url
    event = make_event()
    try:
        outcome = await runner.run(event, attempt=1)
        retry = await runner.run(event, attempt=2)
    finally:
        await runner.aclose()
    assert outcome.ok and retry.ok, (outcome.error, retry.error)
    assert flows.SEEN[event["id"]]["event"] == event
    assert outcome.prefect_flow_run_id != retry.prefect_flow_run_id
    run = await read_run(api_url, outcome.prefect_flow_run_id)
    assert run.name == f"ingest-{event['id']}"
    assert set(run.tags) == {"tenant:acme", "flow:ingest", f"event:{event['id']}", "attempt:1"}
    assert run.state_type == StateType.COMPLETED
    assert run.parameters["event"] == event
    second = await read_run(api_url, retry.prefect_flow_run_id)
    assert second.name == f"ingest-{event['id']}-try2" and "attempt:2" in second.tags


@pytest.mark.parametrize(
    ("flow", "error"),
    [
        (flows.failing_flow, "ValueError: boom for {id}"),
        (flows.async_failing_flow, "KeyError: 'missing'"),
    ],
)
async def test_tracked_failure_has_error_and_failed_run(api_url, flow, error) -> None:
    runner = FlowRunner(flow, tracking="api")
    event = make_event()
    try:
        outcome = await runner.run(event, attempt=1)
    finally:
        await runner.aclose()
    assert not outcome.ok
    assert outcome.error == error.format(id=event["id"])
    assert outcome.traceback is not None and "failing_flow" in outcome.traceback
    run = await read_run(api_url, outcome.prefect_flow_run_id)
    assert run.state_type == StateType.FAILED


async def test_tracked_runs_have_no_heartbeat_stall_and_tasks_work(api_url) -> None:
    runner = FlowRunner(flows.task_flow, tracking="api", max_threads=4)
    try:
        outcomes = await asyncio.gather(*(runner.run(make_event(), 1) for _ in range(8)))
    finally:
        await runner.aclose()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len({o.prefect_flow_run_id for o in outcomes}) == 8


async def test_tracked_runs_run_with_heartbeats_off(api_url) -> None:
    # Prefect joins its heartbeat thread at the end of every sync run (a ~1 s stall) unless
    # the frequency is None; the runner scopes that setting to its runs.
    flows.HEARTBEAT_SEEN.clear()
    runner = FlowRunner(flows.heartbeat_probe, tracking="api")
    try:
        outcome = await runner.run(make_event(), 1)
    finally:
        await runner.aclose()
    assert outcome.ok, outcome.error
    assert flows.HEARTBEAT_SEEN == [None]


async def test_long_and_odd_event_ids(api_url) -> None:
    runner = FlowRunner(flows.custom_param_flow, event_parameter="record", tracking="api")
    event = make_event(id="s3://landing/ïncoming/" + "k" * 960 + "@etag/%20", flow="odd")
    try:
        outcome = await runner.run(event, attempt=1)
    finally:
        await runner.aclose()
    assert outcome.ok, outcome.error
    run = await read_run(api_url, outcome.prefect_flow_run_id)
    assert run.name.startswith("odd-s3://landing/ïncoming/") and run.name.endswith("@etag/%20")
    assert f"event:{event['id']}" in run.tags
    assert run.parameters["record"] == event
