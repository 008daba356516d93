"""The clock contract for ``prefect-event`` against one real Prefect server for the module.

Events are emitted with Prefect's own ``PrefectEventsClient``; the clock subscribes through the
contract's cuttable proxy (``http://127.0.0.1:<proxy>/api``). Each test uses its own event-name
prefix (``contract.<name>.``), so tests sharing the server never see each other's events.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import prefect
import pytest
from prefect import flow
from prefect.events.clients import PrefectEventsClient
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings

from actors.clocks import ClockSpec, CursorStore
from actors.clocks.prefect_event import PrefectEventClock, matches, server_prefixes
from cluster.prefect_server import PrefectServer
from tests.contract.base import ClockContract, Harness, SourceDriver, wait_state

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def prefect_server(request, tmp_path_factory) -> Iterator[PrefectServer]:
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    template_dir = cache.mkdir("prefect-db-template") if cache else tmp_path_factory.mktemp("t")
    server = PrefectServer(
        tmp_path_factory.mktemp("state"),
        template_db=Path(template_dir) / f"prefect-{prefect.__version__}.db",
    )
    # The event persister writes what the REST sweep and the websocket backfill read: flush
    # it often so the suite does not wait on its 5 s default.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")
        server.start()
    try:
        yield server
    finally:
        server.stop()


class PrefectEventDriver(SourceDriver):
    clock_type = "prefect-event"

    def __init__(self, server: PrefectServer) -> None:
        super().__init__()
        self.api_url = server.api_url
        self.host, self.port = server.host, int(server.port or 0)
        self.client: PrefectEventsClient | None = None

    async def setup(self) -> None:
        self.client = await PrefectEventsClient(api_url=self.api_url).__aenter__()

    async def teardown(self) -> None:
        if self.client is not None:
            await self.client.__aexit__(None, None, None)

    def options(self, host: str, port: int) -> dict[str, Any]:
        return {
            "api_url": f"http://{host}:{port}/api",
            "event": f"contract.{self.name}.*",
            "resource": f"contract.{self.name}",
            "max_bytes": MAX_BYTES,
        }

    async def emit(self, name: str, payload: dict[str, Any]) -> Event:
        assert self.client is not None
        event = Event(
            event=f"contract.{self.name}.{name}",
            resource={"prefect.resource.id": f"contract.{self.name}"},
            payload=payload,
        )
        await self.client.emit(event)
        return event

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.emit("published", payload)

    async def publish_malformed(self) -> None:
        # Prefect's server validates every event, so no malformed one can be produced; an
        # event over the clock's max_bytes is the input it must reject instead.
        await self.emit("oversized", {"blob": "x" * (2 * MAX_BYTES)})

    def payload_of(self, event_payload: Any) -> dict[str, Any]:
        return event_payload["body"]["payload"]


class TestPrefectEventContract(ClockContract):
    # Unacked events come back from the REST sweep after a restart, once persisted.
    redelivery_timeout = 30.0

    @pytest.fixture
    def driver(self, prefect_server: PrefectServer) -> PrefectEventDriver:
        return PrefectEventDriver(prefect_server)


# -- connector-specific behaviour ---------------------------------------------------------------


@pytest.fixture
async def emitter(prefect_server: PrefectServer) -> AsyncIterator[PrefectEventDriver]:
    driver = PrefectEventDriver(prefect_server)
    await driver.setup()
    yield driver
    await driver.teardown()


@pytest.fixture
async def clock_for(tmp_path: Path) -> AsyncIterator[Any]:
    harnesses: list[Harness] = []

    async def make(**options: Any) -> Harness:
        spec = ClockSpec(tenant="t", flow="f", name="pe", type="prefect-event", options=options)
        h = await Harness(PrefectEventClock(spec, CursorStore.for_clock(tmp_path, spec))).start()
        harnesses.append(h)
        return h

    yield make
    for h in harnesses:
        await h.stop()


@flow(name="contract-upstream")
def upstream_flow() -> int:
    return 1


async def test_a_completed_flow_run_triggers_an_event_with_the_flow_as_related_resource(
    prefect_server: PrefectServer, clock_for: Any
) -> None:
    h = await clock_for(
        api_url=prefect_server.api_url,
        event="prefect.flow-run.Completed",
        resource="prefect.flow-run.*",
    )
    await wait_state(h.clock, "listening")
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        await asyncio.to_thread(upstream_flow)
    got = await h.take(1, timeout=30)
    body = got.events[0].payload["body"]
    assert got.events[0].id == body["id"]
    assert body["event"] == "prefect.flow-run.Completed"
    assert body["resource"]["prefect.resource.id"].startswith("prefect.flow-run.")
    assert any(r.get("prefect.resource.name") == "contract-upstream" for r in body["related"])


async def test_a_pattern_without_a_star_matches_the_exact_event_name_only(
    emitter: PrefectEventDriver, clock_for: Any
) -> None:
    exact = f"contract.{emitter.name}.done"
    h = await clock_for(api_url=emitter.api_url, event=exact)
    await wait_state(h.clock, "listening")
    await emitter.emit("done-later", {"n": 1})  # shares the prefix, not the name
    await emitter.emit("done", {"n": 2})
    got = await h.take(1)
    assert [e.type for e in got.events] == [exact]
    assert (await h.quiet(2.5)).events == []  # not even from the REST sweeps


async def test_a_new_clock_does_not_deliver_events_from_before_it_first_started(
    emitter: PrefectEventDriver, clock_for: Any
) -> None:
    await emitter.emit("before", {"n": 0})
    await asyncio.sleep(1.5)  # persisted: in the websocket's 1-minute backfill and the sweeps
    h = await clock_for(api_url=emitter.api_url, event=f"contract.{emitter.name}.*")
    await wait_state(h.clock, "listening")
    await emitter.emit("after", {"n": 1})
    got = await h.take(1)
    assert [e.payload["body"]["payload"] for e in got.events] == [{"n": 1}]
    assert (await h.quiet(2.5)).events == []


async def test_a_restarted_iteration_of_the_same_clock_gets_unacked_events_again(
    emitter: PrefectEventDriver, tmp_path: Path
) -> None:
    opts = {"api_url": emitter.api_url, "event": f"contract.{emitter.name}.*"}
    spec = ClockSpec(tenant="t", flow="f", name="pe", type="prefect-event", options=opts)
    clock = PrefectEventClock(spec, CursorStore.for_clock(tmp_path, spec))
    await clock.open()
    try:
        first = clock.batches()
        pending = asyncio.ensure_future(anext(first))
        await wait_state(clock, "listening")
        await emitter.publish({"n": 1})
        seen = [e.id for e in (await asyncio.wait_for(pending, 20)).events]
        await first.aclose()  # the host's task crashed before the ack
        again = clock.batches()
        assert [e.id for e in (await asyncio.wait_for(anext(again), 20)).events] == seen
        await again.aclose()
    finally:
        await clock.close()


async def test_without_an_api_url_the_clock_degrades_and_says_why(
    clock_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        h = await clock_for(event="prefect.flow-run.*")
        await wait_state(h.clock, "degraded")
    assert "PREFECT_API_URL" in (h.clock.error or "")


def test_patterns_match_exactly_or_by_prefix_with_a_trailing_star() -> None:
    assert matches("prefect.flow-run.Completed", ["prefect.flow-run.Completed"])
    assert not matches("prefect.flow-run.Completed2", ["prefect.flow-run.Completed"])
    assert matches("prefect.flow-run.Failed", ["x", "prefect.flow-run.*"])
    assert matches("anything", ["*"])
    assert server_prefixes(["a.b", "c.*"]) == ["a.b", "c."]
    assert server_prefixes(["a", "*"]) is None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "event"),
        ({"event": []}, "event"),
        ({"event": "a.*.b"}, "event"),
        ({"event": "a", "resource": 3}, "resource"),
        ({"event": "a", "api_url": "ws://x"}, "api_url"),
        ({"event": "a", "overlap": -1}, "overlap"),
        ({"event": "a", "max_bytes": 0}, "max_bytes"),
        ({"event": "a", "evnt": "x"}, "evnt"),
    ],
)
def test_bad_options_are_rejected_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PrefectEventClock.check_options(options)


def test_the_api_url_password_is_masked_in_the_source() -> None:
    opts = {"event": "a", "api_url": "https://user:hunter2@prefect.example/api"}
    spec = ClockSpec(tenant="t", flow="f", name="pe", type="prefect-event", options=opts)
    clock = PrefectEventClock(spec, CursorStore(Path(os.devnull)))
    assert "hunter2" not in clock.source and "user:***@" in clock.source
