"""Tracked runs: FlowRunner(tracking="api") against a real PrefectServer (one per module)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import prefect
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType

from actors import prefect_runs
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
    assert run.parameters == {"record": event, "scale": 2}  # defaults too, as a flow call


def record_requests(monkeypatch) -> list[tuple[str, str, Any]]:
    """Every HTTP request any httpx client sends from now on and the server takes: (method,
    path, JSON body). A request answered 429 or 503 (a busy server; Prefect's client sends
    it again) is left out: only the calls that took effect are counted."""
    seen: list[tuple[str, str, Any]] = []
    send, asend = httpx.Client.send, httpx.AsyncClient.send

    def note(request: httpx.Request, response: httpx.Response) -> None:
        if response.status_code in (429, 503):
            return
        path = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "{id}", request.url.path)
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, path, body))

    def sync_send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> Any:
        response = send(self, request, **kwargs)
        note(request, response)
        return response

    async def async_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        response = await asend(self, request, **kwargs)
        note(request, response)
        return response

    monkeypatch.setattr(httpx.Client, "send", sync_send)
    monkeypatch.setattr(httpx.AsyncClient, "send", async_send)
    return seen


@pytest.mark.parametrize("flow", [flows.sync_flow, flows.async_flow])
async def test_tracked_run_is_created_named_and_tagged_in_one_call(
    api_url, flow, monkeypatch
) -> None:
    monkeypatch.setattr(prefect_runs, "STORAGE_TTL", 3600.0)  # however slow the first run
    runner = FlowRunner(flow, tracking="api")
    event = make_event()
    try:
        assert (await runner.run(make_event(), attempt=1)).ok  # clients opened, flow known
        seen = record_requests(monkeypatch)
        outcome = await runner.run(event, attempt=2)
    finally:
        await runner.aclose()
    assert outcome.ok, outcome.error
    run_calls = [(m, p, b) for m, p, b in seen if p.startswith("/api/flow_runs")]
    creates = [b for m, p, b in run_calls if (m, p) == ("POST", "/api/flow_runs/")]
    assert len(creates) == 1
    assert creates[0]["name"] == f"ingest-{event['id']}-try2"
    assert set(creates[0]["tags"]) == {
        "tenant:acme",
        "flow:ingest",
        f"event:{event['id']}",
        "attempt:2",
    }
    assert [m for m, _, _ in run_calls].count("PATCH") == 0  # no rename after creation
    # the flow's id is known from the first run: no upsert of the flow (a write) per run
    assert [(m, p) for m, p, _ in seen if p.startswith("/api/flows")] == []
    # No more calls than calling the flow directly: create, read, Running, Completed.
    assert sorted((m, p) for m, p, _ in run_calls) == [
        ("GET", "/api/flow_runs/{id}"),
        ("POST", "/api/flow_runs/"),
        ("POST", "/api/flow_runs/{id}/set_state"),
        ("POST", "/api/flow_runs/{id}/set_state"),
    ]
    # the server's default result storage was read in the first run: not again this run
    assert [(m, p) for m, p, _ in seen if p == "/api/admin/storage"] == []
    run = await read_run(api_url, outcome.prefect_flow_run_id)
    assert run.name == f"ingest-{event['id']}-try2"


@pytest.mark.parametrize("flow", [flows.sync_flow, flows.async_flow])
async def test_the_servers_result_storage_is_read_again_once_its_reading_is_stale(
    api_url, flow, monkeypatch
) -> None:
    runner = FlowRunner(flow, tracking="api")
    try:
        assert (await runner.run(make_event(), attempt=1)).ok
        monkeypatch.setattr(prefect_runs, "STORAGE_TTL", 0.0)
        seen = record_requests(monkeypatch)
        outcome = await runner.run(make_event(), attempt=1)
    finally:
        await runner.aclose()
    assert outcome.ok, outcome.error
    # Prefect's two reads a run (result store, persist-result default), neither remembered
    assert [(m, p) for m, p, _ in seen if p == "/api/admin/storage"] == [
        ("GET", "/api/admin/storage"),
        ("GET", "/api/admin/storage"),
    ]


async def test_a_flow_with_its_own_run_name_keeps_it(api_url) -> None:
    runner = FlowRunner(flows.self_named_flow, tracking="api")
    event = make_event()
    try:
        outcome = await runner.run(event, attempt=1)
    finally:
        await runner.aclose()
    assert outcome.ok, outcome.error
    run = await read_run(api_url, outcome.prefect_flow_run_id)
    assert run.name == f"own-{event['id']}"
    assert set(run.tags) == {"tenant:acme", "flow:ingest", f"event:{event['id']}", "attempt:1"}


async def test_a_flow_deleted_on_the_server_is_created_again_for_the_next_run(api_url) -> None:
    runner = FlowRunner(flows.sync_flow, tracking="api")
    try:
        first = await runner.run(make_event(), 1)
        assert first.ok, first.error
        flow_id = (await read_run(api_url, first.prefect_flow_run_id)).flow_id
        async with httpx.AsyncClient(base_url=api_url) as api:
            assert (await api.delete(f"/flows/{flow_id}")).status_code == 204
        again = await runner.run(make_event(), 1)
    finally:
        await runner.aclose()
    assert again.ok, again.error
    assert (await read_run(api_url, again.prefect_flow_run_id)).flow_id != flow_id
