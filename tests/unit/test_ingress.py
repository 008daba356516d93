"""HTTP ingress over ASGI, wired to an in-process Coordinator and a Supervisor for control."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    Named,
    RecordingWorker,
    all_in_state,
    flow_counts,
    make_coordinator,
    running,
    wait_for,
)

from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.errors import Unavailable
from actors.event import Event, body_hash
from actors.handles import SourceRejection
from actors.ingress import Ingress, TenantAuth
from actors.supervisor import Supervisor

TOKEN = "acme-secret"
ADMIN = "admin-secret"
ACME = "/v1/events/acme/ingest"
OPEN = "/v1/events/open/ingest"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
TENANT_AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coordinator]:
    flows = [FlowPolicy("acme", "ingest", retries=0), FlowPolicy("open", "ingest", retries=0)]
    tenants = [TenantPolicy("acme"), TenantPolicy("open")]
    worker = RecordingWorker(fail_first=0)
    c = make_coordinator(tmp_path / "ledger.db", [worker], flows=flows, tenants=tenants)
    async with running(c):
        yield c


def make_ingress(coordinator: Any, control: Any = None, **options: Any) -> Ingress:
    return Ingress(
        [("acme", "ingest"), ("open", "ingest")],
        [TenantAuth("acme", TOKEN), TenantAuth("open", None)],
        coordinator,
        control,
        admin_token=ADMIN,
        **options,
    )


@pytest.fixture
async def ingress(coord: Coordinator) -> AsyncIterator[Ingress]:
    control = Supervisor(Named("coordinator", coord), [], [], {})
    yield make_ingress(coord, control, max_payload_bytes=1024)
    await control.stop()  # status() starts its heartbeat loop


def client_for(ingress: Ingress, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=ingress.app, client=(host, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://ingress")


@pytest.fixture
async def client(ingress: Ingress) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(ingress) as c:
        yield c


def signed(body: bytes, key: str = TOKEN) -> dict[str, str]:
    return {"X-Signature": "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()}


# -- events --------------------------------------------------------------------------------
async def test_new_event_is_202_and_its_duplicate_is_200(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    doc = {"id": "e1", "payload": {"a": 1}}
    first = await client.post(ACME, json=doc, headers=TENANT_AUTH)
    again = await client.post(ACME, json=doc, headers=TENANT_AUTH)
    assert (first.status_code, first.json()) == (202, {"id": "e1", "status": "accepted"})
    assert (again.status_code, again.json()) == (200, {"id": "e1", "status": "duplicate"})
    await wait_for(all_in_state(coord, 1, "completed"))
    (event,) = coord.workers[0].events  # type: ignore[attr-defined]
    assert (event["id"], event["source"], event["payload"]) == ("e1", "webhook", {"a": 1})


async def test_event_without_id_is_keyed_by_its_body_hash(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    doc = {"payload": {"b": 2, "a": 1}}
    first = await client.post(OPEN, json=doc)
    again = await client.post(OPEN, content=b'{"payload": {"a": 1, "b": 2}}')
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"] == body_hash({"a": 1, "b": 2})
    await wait_for(all_in_state(coord, 1, "completed"))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"payload": [1]}', "'payload' must be a JSON object"),
        (b'{"payload": {}, "extra": true}', "unknown keys"),
        (b'{"id": "", "payload": {}}', "non-empty string"),
    ],
)
async def test_malformed_body_is_400_and_counted_as_rejected(
    client: httpx.AsyncClient, coord: Coordinator, body: bytes, reason: str
) -> None:
    response = await client.post(OPEN, content=body)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    counts = await flow_counts(coord, "open")
    assert counts["events"]["rejected"] == 1
    assert counts["runs"]["pending"] == 0


async def test_body_over_max_payload_bytes_is_413(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    response = await client.post(OPEN, json={"payload": {"x": "y" * 2000}})
    assert response.status_code == 413
    counts = await flow_counts(coord, "open")
    assert counts["rejected_by_reason"] == {"too_large": 1}


async def test_streamed_body_over_the_limit_without_a_length_is_413(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 300

    response = await client.post(OPEN, content=chunks())
    assert response.status_code == 413


async def test_unknown_flow_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/events/acme/nope", json={"payload": {}})
    assert response.status_code == 404
    assert response.json() == {"error": "unknown flow acme/nope"}


# -- authentication ------------------------------------------------------------------------
async def test_tenant_with_token_refuses_requests_without_credentials(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    response = await client.post(ACME, json={"id": "e1", "payload": {}})
    assert response.status_code == 401
    assert await coord.runs() == []


async def test_tenant_with_token_refuses_a_wrong_bearer(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer wrong"}
    response = await client.post(ACME, json={"payload": {}}, headers=headers)
    assert response.status_code == 401


async def test_tenant_token_as_bearer_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(ACME, json={"payload": {}}, headers=TENANT_AUTH)
    assert response.status_code == 202


async def test_hmac_signature_of_the_body_is_accepted(client: httpx.AsyncClient) -> None:
    body = json.dumps({"id": "signed", "payload": {"k": "v"}}).encode()
    response = await client.post(ACME, content=body, headers=signed(body))
    assert response.status_code == 202


async def test_bad_signature_is_401(client: httpx.AsyncClient, coord: Coordinator) -> None:
    body = json.dumps({"id": "e1", "payload": {}}).encode()
    response = await client.post(ACME, content=body, headers=signed(body, key="not-the-token"))
    assert (response.status_code, response.json()) == (401, {"error": "bad X-Signature"})
    assert await coord.runs() == []


async def test_signature_of_a_different_body_is_401(client: httpx.AsyncClient) -> None:
    body = json.dumps({"id": "e1", "payload": {}}).encode()
    headers = signed(b'{"id": "other", "payload": {}}')
    response = await client.post(ACME, content=body, headers=headers)
    assert response.status_code == 401


async def test_admin_token_may_emit_to_any_tenant(client: httpx.AsyncClient) -> None:
    response = await client.post(ACME, json={"payload": {}}, headers=ADMIN_AUTH)
    assert response.status_code == 202


async def test_tenant_without_token_accepts_loopback_only(ingress: Ingress) -> None:
    async with client_for(ingress, host="10.0.0.1") as remote:
        response = await remote.post(OPEN, json={"payload": {}})
    assert response.status_code == 403
    async with client_for(ingress, host="::1") as local:
        assert (await local.post(OPEN, json={"payload": {}})).status_code == 202


async def test_tenant_with_token_accepts_remote_clients_with_credentials(
    ingress: Ingress,
) -> None:
    async with client_for(ingress, host="10.0.0.1") as remote:
        response = await remote.post(ACME, json={"payload": {}}, headers=TENANT_AUTH)
    assert response.status_code == 202


# -- a coordinator that is down or over quota ----------------------------------------------
class DownCoordinator:
    """A coordinator handle that is restarting: every submit raises Unavailable."""

    def __init__(self) -> None:
        self.calls = 0

    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        self.calls += 1
        raise Unavailable("coordinator restarting")


class ThrottlingCoordinator:
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        return ["throttled"] * len(events)


async def test_unavailable_coordinator_is_503_with_retry_after() -> None:
    down = DownCoordinator()
    async with client_for(make_ingress(down)) as c:
        response = await c.post(OPEN, json={"id": "e1", "payload": {}})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert down.calls == 1


async def test_rejection_is_still_answered_when_the_coordinator_is_down() -> None:
    async with client_for(make_ingress(DownCoordinator())) as c:
        response = await c.post(OPEN, content=b"{broken")
    assert response.status_code == 400


async def test_throttled_event_is_429_with_retry_after() -> None:
    async with client_for(make_ingress(ThrottlingCoordinator())) as c:
        response = await c.post(OPEN, json={"id": "e1", "payload": {}})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


class BusyCoordinator:
    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        return ["busy"] * len(events)


async def test_full_backlog_is_429_with_a_longer_retry_after() -> None:
    async with client_for(make_ingress(BusyCoordinator())) as c:
        response = await c.post(OPEN, json={"id": "e1", "payload": {}})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert "max_pending_runs" in response.json()["error"]


async def test_ingress_counts_its_answers(client: httpx.AsyncClient, ingress: Ingress) -> None:
    await client.post(OPEN, json={"id": "e1", "payload": {}})
    await client.post(OPEN, json={"id": "e1", "payload": {}})
    await client.post(OPEN, content=b"nope")
    await client.post(ACME, json={"payload": {}})
    info = await ingress.ping()
    assert {
        k: info[k] for k in ("accepted", "duplicate", "rejected:malformed", "unauthorized")
    } == {
        "accepted": 1,
        "duplicate": 1,
        "rejected:malformed": 1,
        "unauthorized": 1,
    }


# -- control routes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/status"),
        ("GET", "/v1/runs"),
        ("GET", "/v1/dlq"),
        ("POST", "/v1/dlq/replay"),
        ("GET", "/v1/latencies"),
        ("POST", "/v1/flows/acme/ingest/pause"),
    ],
)
async def test_control_routes_need_the_admin_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    assert (await client.request(method, path)).status_code == 401
    tenant = await client.request(method, path, headers=TENANT_AUTH)
    assert tenant.status_code == 401


async def test_health_needs_no_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/health")
    assert (response.status_code, response.json()) == (200, {"ok": True})


async def test_status_shows_each_flow_with_counts(client: httpx.AsyncClient) -> None:
    await client.post(OPEN, json={"id": "e1", "payload": {}})
    response = await client.get("/v1/status", headers=ADMIN_AUTH)
    assert response.status_code == 200
    flows = {(f["tenant"], f["flow"]): f for f in response.json()["flows"]}
    assert set(flows) == {("acme", "ingest"), ("open", "ingest")}
    assert flows[("open", "ingest")]["state"] == "listening"
    assert flows[("open", "ingest")]["events"]["accepted"] == 1
    assert flows[("open", "ingest")]["clocks"] == []


async def test_pause_and_resume_through_the_control_routes(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    paused = await client.post("/v1/flows/open/ingest/pause", headers=ADMIN_AUTH)
    assert paused.json() == {"tenant": "open", "flow": "ingest", "action": "pause"}
    await client.post(OPEN, json={"id": "e1", "payload": {}})
    status = (await client.get("/v1/status", headers=ADMIN_AUTH)).json()
    (flow,) = [f for f in status["flows"] if f["tenant"] == "open"]
    assert (flow["state"], flow["queued"]) == ("paused", 1)
    resumed = await client.post("/v1/flows/open/ingest/resume", headers=ADMIN_AUTH)
    assert resumed.status_code == 200
    await wait_for(all_in_state(coord, 1, "completed"))


async def test_unknown_flow_or_action_on_control_routes_is_404(
    client: httpx.AsyncClient,
) -> None:
    flow = await client.post("/v1/flows/acme/nope/pause", headers=ADMIN_AUTH)
    action = await client.post("/v1/flows/acme/ingest/explode", headers=ADMIN_AUTH)
    assert (flow.status_code, action.status_code) == (404, 404)


async def test_runs_lists_runs_with_filters(client: httpx.AsyncClient, coord: Coordinator) -> None:
    await client.post(OPEN, json={"id": "e1", "payload": {}})
    await client.post(ACME, json={"id": "e2", "payload": {}}, headers=TENANT_AUTH)
    await wait_for(all_in_state(coord, 2, "completed"))
    everything = (await client.get("/v1/runs", headers=ADMIN_AUTH)).json()["runs"]
    only_open = (await client.get("/v1/runs?tenant=open", headers=ADMIN_AUTH)).json()["runs"]
    assert sorted(r["event_id"] for r in everything) == ["e1", "e2"]
    assert [(r["event_id"], r["state"], r["attempts"]) for r in only_open] == [
        ("e1", "completed", 1)
    ]


async def test_dlq_lists_dead_letters_and_replay_reruns_them(tmp_path: Path) -> None:
    worker = RecordingWorker(fail_first=1)
    flows = [FlowPolicy("acme", "ingest", retries=0), FlowPolicy("open", "ingest", retries=0)]
    tenants = [TenantPolicy("acme"), TenantPolicy("open")]
    coord = make_coordinator(tmp_path / "ledger.db", [worker], flows=flows, tenants=tenants)
    async with running(coord):
        control = Supervisor(Named("coordinator", coord), [], [], {})
        async with client_for(make_ingress(coord, control)) as c:
            await c.post(OPEN, json={"id": "e1", "payload": {}})
            await wait_for(all_in_state(coord, 1, "dead"))
            (dead,) = (await c.get("/v1/dlq", headers=ADMIN_AUTH)).json()["dead"]
            assert (dead["event_id"], dead["attempts"]) == ("e1", 1)
            assert dead["error"] == "failed attempt 1"
            replay = await c.post("/v1/dlq/replay", json={"ids": ["e1"]}, headers=ADMIN_AUTH)
            assert replay.json() == {"replayed": ["open/ingest/e1"]}
            await wait_for(all_in_state(coord, 1, "dead"))
            assert (await c.get("/v1/dlq", headers=ADMIN_AUTH)).json()["dead"][0]["attempts"] == 1
        await control.stop()
    assert worker.calls == [("e1", 1), ("e1", 1)]
    assert worker.series == [0, 1]


async def test_latencies_are_served_to_the_admin(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/latencies", headers=ADMIN_AUTH)
    assert (response.status_code, response.json()) == (200, {"latencies": []})


async def test_dlq_replay_without_a_body_replays_every_dead_letter(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/dlq/replay", headers=ADMIN_AUTH)
    assert (response.status_code, response.json()) == (200, {"replayed": []})


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/dlq/replay", b"{broken"),
        ("POST", "/v1/dlq/replay", b'["e1"]'),
        ("GET", "/v1/runs?limit=many", b""),
    ],
)
async def test_bad_control_request_is_400_not_a_server_error(
    client: httpx.AsyncClient, method: str, path: str, body: bytes
) -> None:
    response = await client.request(method, path, content=body, headers=ADMIN_AUTH)
    assert response.status_code == 400
    assert response.json()["error"].startswith("bad request: ")


class SlowRecordingCoordinator:
    """Takes a while per call (a Ray round trip) and records each batch it was given."""

    def __init__(self, inner: Coordinator) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []

    async def submit(
        self, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        self.batches.append([e.id for e in events])
        await asyncio.sleep(0.02)
        return await self.inner.submit(events, rejections)


async def test_concurrent_posts_share_coordinator_calls_and_each_gets_its_answer(
    coord: Coordinator,
) -> None:
    slow = SlowRecordingCoordinator(coord)
    async with client_for(make_ingress(slow)) as c:
        bodies = [{"id": f"e{i % 20}", "payload": {}} for i in range(30)]  # 10 repeats
        answers = await asyncio.gather(*(c.post(OPEN, json=b) for b in bodies))
    assert sorted(r.status_code for r in answers) == [200] * 10 + [202] * 20
    assert len(slow.batches) < 30  # batched: fewer calls than requests
    assert sorted(i for batch in slow.batches for i in batch) == sorted(b["id"] for b in bodies)
    assert (await flow_counts(coord, "open"))["events"]["accepted"] == 20
