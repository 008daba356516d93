"""ListenerHost with real clocks pushing into an in-process Coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import (
    FlakyCoordinator,
    GatedCoordinator,
    RecordingWorker,
    all_in_state,
    flow_counts,
    make_coordinator,
    run_states,
    running,
    wait_for,
)

import actors.host as host_module
from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, EventClock, RawEvent
from actors.coordinator import Coordinator
from actors.handles import CoordinatorHandle
from actors.host import ListenerHost


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with running(make_coordinator(tmp_path / "ledger.db", [RecordingWorker()])) as c:
        yield c


def worker_of(coord: Coordinator) -> RecordingWorker:
    worker = coord.workers[0]
    assert isinstance(worker, RecordingWorker)
    return worker


def directory_spec(inbox: Path, name: str = "inbox") -> ClockSpec:
    options = {"path": str(inbox), "pattern": "*.json", "poll_interval": 0.1}
    return ClockSpec("acme", "ingest", name, "directory", options)


def cursor_files(state_dir: Path, name: str = "inbox") -> dict[str, str]:
    path = state_dir / "cursors" / "acme" / "ingest" / f"{name}.json"
    return json.loads(path.read_text())["files"] if path.exists() else {}


@contextlib.asynccontextmanager
async def hosting(
    specs: list[ClockSpec], state_dir: Path, coordinator: CoordinatorHandle, **options: Any
) -> AsyncIterator[ListenerHost]:
    # No gc.freeze() of the test process (test_gc_is_frozen_once_clocks_started covers it).
    host = ListenerHost(
        "host-0", list(specs), state_dir, coordinator, **{"freeze_gc": False, **options}
    )
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def clock_state(host: ListenerHost, name: str) -> dict[str, Any]:
    (clock,) = [c for c in await host.clocks() if c["name"] == name]
    return clock


# -- directory clock -----------------------------------------------------------------------
async def test_new_file_becomes_one_accepted_event_and_one_run(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    (inbox / "a.json").write_text('{"x": 1}')
    async with hosting([directory_spec(inbox)], state_dir, coord) as host:
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: str(inbox / "a.json") in cursor_files(state_dir))
        clock = await clock_state(host, "inbox")
        counts = await flow_counts(coord)
    (event,) = worker_of(coord).events
    assert event["payload"]["content"] == {"x": 1}
    assert event["source"] == f"file://{inbox}"
    assert counts["events"] == {"seen": 1, "accepted": 1, "duplicate": 0, "rejected": 0}
    assert (clock["state"], clock["events"]) == ("listening", 1)


async def test_cursor_advances_only_after_the_coordinator_confirmed(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    gated = GatedCoordinator(coord)
    (inbox / "a.json").write_text("{}")
    async with hosting([directory_spec(inbox)], state_dir, gated):
        await wait_for(lambda: gated.waiting == 1)
        assert cursor_files(state_dir) == {}
        assert await run_states(coord) == {}
        gated.gate.set()
        await wait_for(lambda: str(inbox / "a.json") in cursor_files(state_dir))
        await wait_for(all_in_state(coord, 1, "completed"))
    assert len(worker_of(coord).calls) == 1


async def test_unavailable_coordinator_gets_the_batch_again_and_nothing_is_lost(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    for name in ("a", "b", "c"):
        (inbox / f"{name}.json").write_text(json.dumps({"name": name}))
    flaky = FlakyCoordinator(coord, failures=3)
    async with hosting([directory_spec(inbox)], state_dir, flaky):
        await wait_for(all_in_state(coord, 3, "completed"))
        await wait_for(lambda: len(cursor_files(state_dir)) == 3)
        counts = await flow_counts(coord)
    assert flaky.calls == 4
    assert counts["events"] == {"seen": 3, "accepted": 3, "duplicate": 0, "rejected": 0}
    assert sorted(e["payload"]["content"]["name"] for e in worker_of(coord).events) == [
        "a",
        "b",
        "c",
    ]


async def test_lost_replies_are_resent_as_duplicates_and_run_once(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    (inbox / "a.json").write_text("{}")
    flaky = FlakyCoordinator(coord, failures=2, lose_replies=True)
    async with hosting([directory_spec(inbox)], state_dir, flaky):
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: len(cursor_files(state_dir)) == 1)
        counts = await flow_counts(coord)
    assert counts["events"] == {"seen": 3, "accepted": 1, "duplicate": 2, "rejected": 0}
    assert len(worker_of(coord).calls) == 1


async def test_malformed_file_is_a_counted_rejection_and_never_runs(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    (inbox / "bad.json").write_text("{not json")
    (inbox / "good.json").write_text("{}")
    async with hosting([directory_spec(inbox)], state_dir, coord):
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: len(cursor_files(state_dir)) == 2)
        counts = await flow_counts(coord)
    assert counts["events"] == {"seen": 1, "accepted": 1, "duplicate": 0, "rejected": 1}
    assert counts["rejected_by_reason"] == {"malformed": 1}
    assert [e["payload"]["name"] for e in worker_of(coord).events] == ["good.json"]


async def test_restarted_host_does_not_resubmit_acked_files(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    (inbox / "a.json").write_text("{}")
    async with hosting([directory_spec(inbox)], state_dir, coord):
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: len(cursor_files(state_dir)) == 1)
    async with hosting([directory_spec(inbox)], state_dir, coord) as host:
        await wait_for(lambda: _is_listening(host, "inbox"))
        (inbox / "b.json").write_text("{}")
        await wait_for(all_in_state(coord, 2, "completed"))
        counts = await flow_counts(coord)
    assert counts["events"] == {"seen": 2, "accepted": 2, "duplicate": 0, "rejected": 0}


async def _is_listening(host: ListenerHost, name: str) -> bool:
    return (await clock_state(host, name))["state"] == "listening"


# -- interval clock ------------------------------------------------------------------------
async def test_interval_ticks_run_once_each_across_a_host_restart(
    state_dir: Path, coord: Coordinator
) -> None:
    spec = ClockSpec("acme", "ingest", "tick", "interval", {"every": "50ms"})
    async with hosting([spec], state_dir, coord):
        await wait_for(lambda: _runs_at_least(coord, 3))
    async with hosting([spec], state_dir, coord):
        before = len(await coord.runs())
        await wait_for(lambda: _runs_at_least(coord, before + 2))
    runs = await coord.runs()
    await wait_for(all_in_state(coord, len(runs), "completed"))
    counts = await flow_counts(coord)
    ids = [e["id"] for e in worker_of(coord).events]
    assert counts["events"]["duplicate"] == 0
    assert counts["events"]["accepted"] == len(runs) == len(ids) == len(set(ids))
    assert all(i.startswith("tick:") for i in ids)
    assert {e["type"] for e in worker_of(coord).events} == {"tick"}


async def _runs_at_least(coord: Coordinator, n: int) -> bool:
    return len(await coord.runs()) >= n


# -- crashing clocks -----------------------------------------------------------------------
class ExplodingClock(EventClock):
    """A test-only clock whose source blows up on open."""

    type = "exploding"
    opens: ClassVar[int] = 0

    async def open(self) -> None:
        type(self).opens += 1
        raise RuntimeError("source exploded")

    async def batches(self) -> AsyncIterator[Batch]:
        raise AssertionError("never reached")
        yield Batch()


class RecoveringClock(EventClock):
    """A test-only clock that crashes on its first ``failures`` opens, then yields one event."""

    type = "recovering"
    failures: ClassVar[int] = 2

    async def open(self) -> None:
        if type(self).failures > 0:
            type(self).failures -= 1
            raise ConnectionError("source not ready")

    async def batches(self) -> AsyncIterator[Batch]:
        self.set_listening()
        yield Batch(events=[RawEvent("r1", "test", "2024-01-01T00:00:00+00:00", {})])
        await asyncio.Event().wait()


class SleepRecorder:
    """Stands in for the ``asyncio`` module inside ``actors.host``: records every sleep
    the host asks for and sleeps only briefly, so backoff is observed without waiting."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await asyncio.sleep(0.005)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> SleepRecorder:
    recorder = SleepRecorder()
    monkeypatch.setattr(host_module, "asyncio", recorder)
    monkeypatch.setattr(host_module, "CRASHES_BEFORE_FAILED", 3)
    monkeypatch.setattr(host_module, "MAX_CLOCK_BACKOFF", 1.0)
    monkeypatch.setitem(CLOCK_TYPES, "exploding", ExplodingClock)
    monkeypatch.setitem(CLOCK_TYPES, "recovering", RecoveringClock)
    monkeypatch.setattr(ExplodingClock, "opens", 0)
    monkeypatch.setattr(RecoveringClock, "failures", 2)
    return recorder


async def test_crashing_clock_is_restarted_with_backoff_then_marked_failed(
    state_dir: Path, coord: Coordinator, sleeps: SleepRecorder
) -> None:
    bad = ClockSpec("acme", "ingest", "bad", "exploding")
    good = ClockSpec("acme", "ingest", "hook", "webhook")
    async with hosting([bad, good], state_dir, coord) as host:
        await wait_for(lambda: len(sleeps.sleeps) >= 4)
        failed = await clock_state(host, "bad")
        healthy = await clock_state(host, "hook")
    assert sleeps.sleeps[:4] == [0.5, 1.0, 1.0, 1.0]
    assert (failed["state"], failed["error"]) == ("failed", "RuntimeError: source exploded")
    assert ExplodingClock.opens >= 4
    assert (healthy["state"], healthy["error"]) == ("listening", None)


async def test_clock_that_crashes_then_recovers_delivers_and_listens(
    state_dir: Path, coord: Coordinator, sleeps: SleepRecorder
) -> None:
    spec = ClockSpec("acme", "ingest", "flaky", "recovering")
    async with hosting([spec], state_dir, coord) as host:
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: _is_listening(host, "flaky"))
        clock = await clock_state(host, "flaky")
    assert sleeps.sleeps == [0.5, 1.0]
    assert (clock["error"], clock["events"]) == (None, 1)


# -- host surface --------------------------------------------------------------------------
async def test_added_clocks_start_and_a_known_clock_is_not_added_twice(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    (inbox / "a.json").write_text("{}")
    async with hosting([], state_dir, coord) as host:
        await host.add_clocks([directory_spec(inbox)])
        await host.add_clocks([directory_spec(inbox)])
        await wait_for(all_in_state(coord, 1, "completed"))
        info = await host.ping()
        clocks = await host.clocks()
    assert info["name"] == "host-0"
    # The heartbeat carries per-state counts only; the clock list comes from clocks().
    assert info["clock_count"] == 1
    assert info["clock_states"] == {"listening": 1}
    assert "clocks" not in info
    assert [c["name"] for c in clocks] == ["inbox"]
    assert len(host.specs) == 1


async def test_gc_is_frozen_once_clocks_started(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    host = ListenerHost("host-0", [directory_spec(inbox)], state_dir, coord)
    gc.unfreeze()
    try:
        await host.start()
        assert host._freezer is not None
        await asyncio.wait_for(host._freezer, 10)
        assert (await clock_state(host, "inbox"))["state"] == "listening"
        assert gc.get_freeze_count() > 0
    finally:
        await host.stop()
        gc.unfreeze()


async def test_clock_filter_drops_non_matching_events_and_counts_them(
    inbox: Path, state_dir: Path, coord: Coordinator
) -> None:
    spec = ClockSpec(
        "acme",
        "ingest",
        "big-orders",
        "directory",
        {
            "path": str(inbox),
            "pattern": "*.json",
            "poll_interval": 0.1,
            "filter": "payload.content.amount > `100`",
        },
    )
    async with hosting([spec], state_dir, coord) as host:
        (inbox / "small.json").write_text(json.dumps({"amount": 5}))
        (inbox / "big.json").write_text(json.dumps({"amount": 500}))
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: _filtered(host), timeout=10)
        (clock,) = await host.clocks()
        assert clock["filtered"] == 1
        counts = await flow_counts(coord)
    assert [e["payload"]["name"] for e in worker_of(coord).events] == ["big.json"]
    assert counts["events"]["accepted"] == 1


async def _filtered(host: ListenerHost) -> dict[str, Any] | None:
    (clock,) = await host.clocks()
    return clock if clock["filtered"] else None


class BusyCoordinator:
    """Answers ``busy`` for the first ``busy_for`` submits, then passes through."""

    def __init__(self, inner: Coordinator, busy_for: int, state_dir: Path) -> None:
        self.inner = inner
        self.busy_for = busy_for
        self.state_dir = state_dir
        self.calls = 0
        self.acked_while_busy: list[dict[str, str]] = []

    async def submit(self, events: list[Any], rejections: list[Any] | None = None) -> list[str]:
        self.calls += 1
        if self.calls <= self.busy_for:
            self.acked_while_busy.append(cursor_files(self.state_dir))
            return ["busy"] * len(events)
        return await self.inner.submit(events, rejections)


async def test_busy_coordinator_holds_the_batch_unacked_and_backs_off(
    inbox: Path, state_dir: Path, coord: Coordinator, sleeps: SleepRecorder
) -> None:
    (inbox / "a.json").write_text("{}")
    busy = BusyCoordinator(coord, busy_for=3, state_dir=state_dir)
    async with hosting([directory_spec(inbox)], state_dir, busy):
        await wait_for(all_in_state(coord, 1, "completed"))
        await wait_for(lambda: str(inbox / "a.json") in cursor_files(state_dir))
    assert busy.calls == 4
    assert busy.acked_while_busy == [{}, {}, {}]  # not acked while the backlog is full
    base = host_module.THROTTLE_RETRY
    assert sleeps.sleeps == [base, base * 2, base * 4]


# -- pushes in flight ----------------------------------------------------------------------
class CountingClock(EventClock):
    """A test-only clock: ``reads`` reads of ``size`` events with ids ``<name>-<n>``, in order."""

    type = "counting"
    OPTIONS = frozenset({"reads", "size"})

    async def batches(self) -> AsyncIterator[Batch]:
        self.set_listening()
        size, n = int(self.spec.options["size"]), 0
        for _ in range(int(self.spec.options["reads"])):
            ids = [f"{self.name}-{n + i:04d}" for i in range(size)]
            yield Batch([RawEvent(i, "test", "2024-01-01T00:00:00+00:00", {}) for i in ids])
            n += size
        await asyncio.Event().wait()


class SlowCoordinator:
    """Takes a while to answer each submit; records arrival order and calls at once."""

    def __init__(self, inner: Coordinator) -> None:
        self.inner = inner
        self.arrived: list[str] = []
        self.at_once = 0
        self.most_at_once = 0

    async def submit(self, events: list[Any], rejections: list[Any] | None = None) -> list[str]:
        self.arrived += [e.id for e in events]
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        await asyncio.sleep(0.005)
        try:
            return await self.inner.submit(events, rejections)
        finally:
            self.at_once -= 1


async def test_two_pushes_in_flight_keep_each_clocks_events_in_order_and_claim_each_once(
    state_dir: Path, coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CLOCK_TYPES, "counting", CountingClock)
    specs = [
        ClockSpec("acme", "ingest", f"c{k}", "counting", {"reads": 8, "size": 30}) for k in range(4)
    ]
    slow = SlowCoordinator(coord)
    async with hosting(specs, state_dir, slow, max_batch=30) as host:  # a read a push
        assert host.max_inflight == 2
        await wait_for(lambda: len(slow.arrived) == 4 * 8 * 30, timeout=20)
        await wait_for(all_in_state(coord, 4 * 8 * 30, "completed"), timeout=20)
    assert slow.most_at_once == 2
    for k in range(4):
        mine = [i for i in slow.arrived if i.startswith(f"c{k}-")]
        assert mine == [f"c{k}-{n:04d}" for n in range(8 * 30)]
    assert (await flow_counts(coord))["events"] == {
        "seen": 960,
        "accepted": 960,
        "duplicate": 0,
        "rejected": 0,
    }
    assert sorted(worker_of(coord).ids()) == sorted(slow.arrived)
