"""Supervisor: heartbeats, restarts with backoff, re-homing clocks, per-flow state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Named, RecordingWorker, make_coordinator, make_event, running, wait_for

import actors.supervisor as supervisor_module
from actors.clocks import ClockSpec
from actors.coordinator import Coordinator, FlowPolicy
from actors.errors import Unavailable
from actors.supervisor import Supervisor


class FakeTarget:
    """A PingHandle (and clock host) that is healthy, dead (Unavailable) or hung."""

    def __init__(
        self, name: str, mode: str = "healthy", clocks: list[dict[str, Any]] | None = None
    ) -> None:
        self.name = name
        self.mode = mode
        self.clock_list = clocks or []
        self.pings = 0
        self.restarts = 0
        self.fail_restart = False
        self.fail_add = False
        self.added: list[ClockSpec] = []

    async def ping(self, timeout: float) -> dict[str, Any]:
        self.pings += 1
        if self.mode == "dead":
            raise Unavailable(f"{self.name} is dead")
        if self.mode == "hung":  # alive but stuck: the caller's timeout fires
            await asyncio.wait_for(asyncio.sleep(3600), timeout)
        return {"name": self.name, "clock_count": len(self.clock_list)}

    async def clocks(self) -> list[dict[str, Any]]:
        if self.mode == "dead":
            raise Unavailable(f"{self.name} is dead")
        return self.clock_list

    async def restart(self) -> None:
        self.restarts += 1
        if self.fail_restart:
            raise RuntimeError("cannot restart")

    async def add_clocks(self, specs: list[ClockSpec]) -> None:
        if self.fail_add:
            raise Unavailable(f"{self.name} died")
        self.added.extend(specs)


class FakeTime:
    """Replaces the ``time`` module inside ``actors.supervisor``: time moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(supervisor_module, "time", fake)
    return fake


@pytest.fixture
async def supervisors() -> AsyncIterator[list[Supervisor]]:
    """Supervisors made by a test; stopped at the end (status() starts their loop)."""
    made: list[Supervisor] = []
    yield made
    for s in made:
        await s.stop()


@pytest.fixture
def supervise(supervisors: list[Supervisor]) -> Any:
    def make(
        coordinator: Any = None,
        hosts: list[FakeTarget] | None = None,
        others: list[FakeTarget] | None = None,
        host_specs: dict[str, list[ClockSpec]] | None = None,
        **options: Any,
    ) -> Supervisor:
        options.setdefault("interval", 1.0)
        s = Supervisor(
            coordinator or FakeTarget("coordinator"),
            hosts or [],  # type: ignore[arg-type]
            others or [],  # type: ignore[arg-type]
            host_specs or {},
            **options,
        )
        supervisors.append(s)
        return s

    return make


def spec(name: str) -> ClockSpec:
    return ClockSpec("acme", "ingest", name, "interval", {"every": "60s"})


def actor(s: Supervisor, name: str) -> dict[str, Any]:
    (a,) = [a for a in s.actors() if a["name"] == name]
    return a


# -- restarts ------------------------------------------------------------------------------
async def test_dead_target_is_restarted_after_misses_allowed_misses(supervise: Any) -> None:
    dead = FakeTarget("worker-0", "dead")
    s = supervise(others=[dead], misses_allowed=2)
    await s.check_once()
    assert dead.restarts == 0
    await s.check_once()
    assert dead.restarts == 1
    assert actor(s, "worker-0") | {"last_ok": None} == {
        "name": "worker-0",
        "alive": False,
        "restarts": 1,
        "last_ok": None,
        "error": "worker-0 is dead",
    }


async def test_hung_target_is_restarted_like_a_dead_one(supervise: Any) -> None:
    hung = FakeTarget("host-0", "hung")
    s = supervise(others=[hung], misses_allowed=2, ping_timeout=0.05)
    await s.check_once()
    await s.check_once()
    assert hung.restarts == 1
    assert actor(s, "host-0")["error"].startswith("TimeoutError")


async def test_healthy_target_is_never_restarted(supervise: Any) -> None:
    healthy, dead = FakeTarget("worker-0"), FakeTarget("worker-1", "dead")
    s = supervise(others=[healthy, dead], misses_allowed=1)
    for _ in range(5):
        await s.check_once()
    assert (healthy.pings, healthy.restarts) == (5, 0)
    assert actor(s, "worker-0")["alive"] is True
    assert dead.restarts == 1  # the others are in backoff


async def test_one_good_heartbeat_resets_the_misses(supervise: Any) -> None:
    flaky = FakeTarget("worker-0", "dead")
    s = supervise(others=[flaky], misses_allowed=2)
    await s.check_once()
    flaky.mode = "healthy"
    await s.check_once()
    flaky.mode = "dead"
    await s.check_once()
    assert flaky.restarts == 0


async def test_restarts_of_one_target_back_off_exponentially(
    supervise: Any, clock: FakeTime
) -> None:
    dead = FakeTarget("worker-0", "dead")
    s = supervise(others=[dead], misses_allowed=1, interval=1.0)
    seen = []
    for t in (0.0, 0.0, 1.9, 2.0, 2.0, 5.9, 6.0, 13.9, 14.0):
        clock.now = 1000.0 + t
        await s.check_once()
        seen.append(dead.restarts)
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3, 4]


async def test_restart_backoff_is_capped_at_a_minute(supervise: Any, clock: FakeTime) -> None:
    dead = FakeTarget("worker-0", "dead")
    s = supervise(others=[dead], misses_allowed=1, interval=20.0)
    await s.check_once()  # restart 1, next in 40 s
    clock.now += 40
    await s.check_once()  # restart 2, next in min(60, 80) s
    clock.now += 59.9
    await s.check_once()
    assert dead.restarts == 2
    clock.now += 0.1
    await s.check_once()
    assert dead.restarts == 3


async def test_a_failing_restart_does_not_stop_supervision(supervise: Any, clock: FakeTime) -> None:
    dead = FakeTarget("worker-0", "dead")
    dead.fail_restart = True
    s = supervise(others=[dead], misses_allowed=1)
    await s.check_once()
    clock.now += 10
    await s.check_once()
    assert dead.restarts == 2


async def test_background_loop_restarts_a_dead_target(supervise: Any) -> None:
    dead, healthy = FakeTarget("worker-0", "dead"), FakeTarget("worker-1")
    s = supervise(others=[dead, healthy], misses_allowed=2, interval=0.01)
    await s.start()
    await wait_for(lambda: dead.restarts >= 1)
    await s.stop()
    assert healthy.restarts == 0


async def test_targets_added_later_are_watched(supervise: Any) -> None:
    s = supervise(misses_allowed=1)
    late = FakeTarget("ingress", "dead")
    await s.watch(late)
    await s.check_once()
    assert late.restarts == 1


# -- re-homing -----------------------------------------------------------------------------
async def test_clocks_of_a_host_that_keeps_dying_move_to_the_least_loaded_live_host(
    supervise: Any, clock: FakeTime
) -> None:
    h0, h1, h2 = FakeTarget("host-0", "dead"), FakeTarget("host-1"), FakeTarget("host-2")
    specs = {"host-0": [spec("a"), spec("b")], "host-1": [spec("c")], "host-2": [spec("d")] * 2}
    s = supervise(hosts=[h0, h1, h2], host_specs=specs, misses_allowed=1, rehome_after_restarts=2)
    await s.check_once()
    assert h1.added == []
    clock.now += 10
    await s.check_once()
    assert h0.restarts == 2
    assert [x.name for x in h1.added] == ["a", "b"]
    assert h2.added == []
    assert {k: [x.name for x in v] for k, v in s.host_specs.items()} == {
        "host-1": ["c", "a", "b"],
        "host-2": ["d", "d"],
    }
    clock.now += 100
    await s.check_once()
    assert [x.name for x in h1.added] == ["a", "b"]


async def test_clocks_stay_put_when_no_other_host_is_alive(supervise: Any, clock: FakeTime) -> None:
    h0, h1 = FakeTarget("host-0", "dead"), FakeTarget("host-1", "dead")
    specs = {"host-0": [spec("a")], "host-1": [spec("b")]}
    s = supervise(hosts=[h0, h1], host_specs=specs, misses_allowed=1, rehome_after_restarts=2)
    await s.check_once()
    clock.now += 10
    await s.check_once()
    assert (h0.restarts, h1.restarts) == (2, 2)
    assert (h0.added, h1.added) == ([], [])
    assert {k: [x.name for x in v] for k, v in s.host_specs.items()} == {
        "host-0": ["a"],
        "host-1": ["b"],
    }


async def test_rehoming_onto_a_host_that_fails_keeps_the_clocks_and_supervision_going(
    supervise: Any, clock: FakeTime
) -> None:
    h0, h1 = FakeTarget("host-0", "dead"), FakeTarget("host-1")
    h1.fail_add = True
    specs = {"host-0": [spec("a")], "host-1": [spec("b")]}
    s = supervise(hosts=[h0, h1], host_specs=specs, misses_allowed=1, rehome_after_restarts=1)
    await s.check_once()
    assert {k: [x.name for x in v] for k, v in s.host_specs.items()} == {
        "host-0": ["a"],
        "host-1": ["b"],
    }
    h1.fail_add = False
    clock.now += 10
    await s.check_once()
    assert [x.name for x in h1.added] == ["a"]
    assert {k: [x.name for x in v] for k, v in s.host_specs.items()} == {"host-1": ["b", "a"]}


# -- status --------------------------------------------------------------------------------
def clock_info(flow: str, name: str, state: str, error: str | None = None) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "flow": flow,
        "name": name,
        "type": "directory",
        "state": state,
        "error": error,
        "events": 0,
        "last_event_at": None,
    }


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coordinator]:
    flows = [FlowPolicy("acme", f) for f in ("ok", "held", "broken", "slow")]
    async with running(make_coordinator(tmp_path / "l.db", [RecordingWorker()], flows=flows)) as c:
        yield c


async def test_status_joins_coordinator_counts_with_host_clock_states(
    supervise: Any, coord: Coordinator
) -> None:
    h0 = FakeTarget(
        "host-0",
        clocks=[
            clock_info("ok", "inbox", "listening"),
            clock_info("held", "inbox", "listening"),
            clock_info("broken", "inbox", "listening"),
        ],
    )
    h1 = FakeTarget(
        "host-1",
        clocks=[
            clock_info("broken", "bucket", "failed", "ClientError: access denied"),
            clock_info("slow", "bucket", "degraded", "endpoint unreachable"),
        ],
    )
    s = supervise(coordinator=Named("coordinator", coord), hosts=[h0, h1])
    await coord.pause("acme", "held")
    await coord.submit([], [])
    status = await s.status()
    flows = {f["flow"]: f for f in status["flows"]}
    assert {name: f["state"] for name, f in flows.items()} == {
        "ok": "listening",
        "held": "paused",
        "broken": "failed",
        "slow": "listening",
    }
    assert flows["broken"]["clocks"] == [
        {
            "name": "inbox",
            "type": "directory",
            "state": "listening",
            "error": None,
            "events": 0,
        },
        {
            "name": "bucket",
            "type": "directory",
            "state": "failed",
            "error": "ClientError: access denied",
            "events": 0,
        },
    ]
    assert flows["ok"]["events"] == {"seen": 0, "accepted": 0, "duplicate": 0, "rejected": 0}
    assert set(flows["ok"]["runs"]) == {"pending", "running", "completed", "failed", "dead"}
    assert flows["ok"]["last_event_age"] is None
    assert {a["name"] for a in status["actors"]} == {"coordinator", "host-0", "host-1"}


async def test_status_keeps_the_last_clock_list_of_a_host_that_stops_answering(
    supervise: Any, coord: Coordinator
) -> None:
    host = FakeTarget("host-0", clocks=[clock_info("ok", "inbox", "listening")])
    s = supervise(coordinator=Named("coordinator", coord), hosts=[host])
    await coord.submit([], [])
    await s.check_once()  # a heartbeat alone: counts, no clock list
    assert s.clocks() == []
    assert [c["name"] for c in _flow(await s.status(), "ok")["clocks"]] == ["inbox"]
    host.mode = "dead"
    host.clock_list = []
    assert [c["name"] for c in _flow(await s.status(), "ok")["clocks"]] == ["inbox"]


def _flow(status: dict[str, Any], name: str) -> dict[str, Any]:
    (flow,) = [f for f in status["flows"] if f["flow"] == name]
    return flow


async def test_status_shows_events_and_age_of_the_last_one(
    supervise: Any, coord: Coordinator
) -> None:
    s = supervise(coordinator=Named("coordinator", coord))
    await coord.submit([make_event("e1", flow="ok"), make_event("e1", flow="ok")])
    (ok,) = [f for f in (await s.status())["flows"] if f["flow"] == "ok"]
    assert ok["events"] == {"seen": 2, "accepted": 1, "duplicate": 1, "rejected": 0}
    assert ok["last_event_age"] is not None and ok["last_event_age"] >= 0


async def test_control_calls_go_to_the_coordinator(supervise: Any, coord: Coordinator) -> None:
    s = supervise(coordinator=Named("coordinator", coord))
    await s.pause("acme", "ok")
    assert await coord.ledger.paused() == {("acme", "ok")}
    await s.resume("acme", "ok")
    assert await coord.ledger.paused() == set()
    assert await s.runs(None, None, None, 10) == []
    assert await s.replay(None) == []
    assert await s.latencies(False) == []
