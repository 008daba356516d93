"""Coordinator without Ray: events in, exactly one run each on in-process workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flows_unit
import pytest
from flows_unit import CALLS
from helpers import (
    RecordingWorker,
    all_in_state,
    flow_counts,
    make_coordinator,
    make_event,
    run_states,
    running,
    wait_for,
)

from actors.claims import batches_of, in_input_order, pack_batches
from actors.clocks import Rejection
from actors.coordinator import FlowPolicy, TenantPolicy
from actors.handles import SourceRejection
from actors.ledger import SQLiteLedger
from actors.worker import FlowTarget, FlowWorker


@pytest.fixture(autouse=True)
def _fresh_flows() -> Iterator[None]:
    flows_unit.reset()
    yield
    flows_unit.reset()


def flow_worker(flow_obj: Any, index: int = 0) -> FlowWorker:
    return FlowWorker(index, [FlowTarget("acme", "ingest", flow_obj=flow_obj)], tracking="off")


def calls() -> dict[str, list[int | None]]:
    return dict(CALLS)


async def runs_by_id(coord: Any) -> dict[str, dict[str, Any]]:
    return {r["event_id"]: r for r in await coord.runs()}


# -- one run per event ---------------------------------------------------------------------
async def test_each_new_event_runs_its_flow_exactly_once(tmp_path: Path) -> None:
    workers = [flow_worker(flows_unit.record_flow, 0), flow_worker(flows_unit.record_flow, 1)]
    events = [make_event(f"e{i}") for i in range(6)]
    async with running(make_coordinator(tmp_path / "ledger.db", workers)) as coord:
        assert await coord.submit(events) == ["accepted"] * 6
        await wait_for(all_in_state(coord, 6, "completed"))
    assert calls() == {f"e{i}": [1] for i in range(6)}
    assert [w.runs_started for w in workers] == [3, 3]


async def test_flow_receives_the_whole_event_in_its_parameter(tmp_path: Path) -> None:
    ev = make_event("e1", payload={"key": "incoming/a.csv"})
    worker = flow_worker(flows_unit.async_record_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        await coord.submit([ev])
        await wait_for(all_in_state(coord, 1, "completed"))
    assert flows_unit.EVENTS["e1"] == ev.to_dict()


async def test_duplicates_in_one_batch_run_once(tmp_path: Path) -> None:
    worker = flow_worker(flows_unit.record_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        outcomes = await coord.submit([make_event("a"), make_event("a"), make_event("b")])
        assert outcomes == ["accepted", "duplicate", "accepted"]
        await wait_for(all_in_state(coord, 2, "completed"))
    assert calls() == {"a": [1], "b": [1]}


async def test_duplicates_across_batches_run_once(tmp_path: Path) -> None:
    worker = flow_worker(flows_unit.record_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        assert await coord.submit([make_event("a")]) == ["accepted"]
        await wait_for(all_in_state(coord, 1, "completed"))
        assert await coord.submit([make_event("a"), make_event("b")]) == ["duplicate", "accepted"]
        await wait_for(all_in_state(coord, 2, "completed"))
        counts = await flow_counts(coord)
    assert calls() == {"a": [1], "b": [1]}
    assert counts["events"] == {"seen": 3, "accepted": 2, "duplicate": 1, "rejected": 0}


async def test_duplicate_of_a_run_in_progress_does_not_start_another(tmp_path: Path) -> None:
    gate = asyncio.Event()
    worker = RecordingWorker(gate=gate)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        await coord.submit([make_event("a")])
        await wait_for(all_in_state(coord, 1, "running"))
        assert await coord.submit([make_event("a")]) == ["duplicate"]
        gate.set()
        await wait_for(all_in_state(coord, 1, "completed"))
    assert worker.calls == [("a", 1)]


async def test_unknown_flow_is_rejected_and_not_stored(tmp_path: Path) -> None:
    worker = RecordingWorker()
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        outcomes = await coord.submit([make_event("a", flow="nope"), make_event("b")])
        assert outcomes == ["rejected:unknown_flow", "accepted"]
        await wait_for(all_in_state(coord, 1, "completed"))
    assert worker.ids() == ["b"]


async def test_source_rejections_are_counted_by_reason(tmp_path: Path) -> None:
    bad = SourceRejection("acme", "ingest", "file", Rejection("malformed", "not JSON", "/x"))
    async with running(make_coordinator(tmp_path / "ledger.db", [RecordingWorker()])) as coord:
        assert await coord.submit([], [bad, bad]) == []
        counts = await flow_counts(coord)
    assert counts["events"]["rejected"] == 2
    assert counts["rejected_by_reason"] == {"malformed": 2}
    assert counts["runs"]["pending"] == 0


# -- quotas and fairness -------------------------------------------------------------------
TWO_TENANTS = [FlowPolicy("acme", "ingest"), FlowPolicy("beta", "ingest")]


async def test_events_over_the_tenant_rate_are_throttled_and_not_stored(tmp_path: Path) -> None:
    tenants = [TenantPolicy("acme", max_events_per_second=2), TenantPolicy("beta")]
    worker = RecordingWorker()
    coord = make_coordinator(tmp_path / "ledger.db", [worker], flows=TWO_TENANTS, tenants=tenants)
    async with running(coord):
        batch = [make_event(f"a{i}") for i in range(5)] + [make_event("b0", tenant="beta")]
        outcomes = await coord.submit(batch)
        assert outcomes == ["accepted"] * 2 + ["throttled"] * 3 + ["accepted"]
        await wait_for(all_in_state(coord, 3, "completed"))
        counts = await flow_counts(coord)
    assert sorted(worker.ids()) == ["a0", "a1", "b0"]
    assert counts["events"]["seen"] == 2


async def test_tenant_max_concurrent_runs_is_respected(tmp_path: Path) -> None:
    tenants = [TenantPolicy("acme", max_concurrent_runs=2), TenantPolicy("beta", 1)]
    gate = asyncio.Event()
    worker = RecordingWorker(gate=gate)
    coord = make_coordinator(
        tmp_path / "ledger.db", [worker, worker], flows=TWO_TENANTS, tenants=tenants
    )
    async with running(coord):
        await coord.submit([make_event(f"a{i}") for i in range(6)])
        await coord.submit([make_event(f"b{i}", tenant="beta") for i in range(3)])
        await wait_for(lambda: worker.running == 3)
        acme, beta = await flow_counts(coord), await flow_counts(coord, "beta")
        assert (acme["runs"]["running"], acme["queued"]) == (2, 4)
        assert (beta["runs"]["running"], beta["queued"]) == (1, 2)
        gate.set()
        await wait_for(all_in_state(coord, 9, "completed"))
    assert worker.max_by_tenant == {"acme": 2, "beta": 1}
    assert len(worker.calls) == 9


async def test_worker_concurrency_caps_runs_per_worker(tmp_path: Path) -> None:
    gate = asyncio.Event()
    workers = [RecordingWorker(gate=gate), RecordingWorker(gate=gate)]
    coord = make_coordinator(tmp_path / "ledger.db", workers, worker_concurrency=1)
    async with running(coord):
        await coord.submit([make_event(f"e{i}") for i in range(4)])
        await wait_for(lambda: sum(w.running for w in workers) == 2)
        assert (await flow_counts(coord))["queued"] == 2
        gate.set()
        await wait_for(all_in_state(coord, 4, "completed"))
    assert [w.max_running for w in workers] == [1, 1]
    assert sorted(workers[0].ids() + workers[1].ids()) == ["e0", "e1", "e2", "e3"]


# -- pause and resume ----------------------------------------------------------------------
async def test_pause_holds_runs_and_resume_releases_all_of_them(tmp_path: Path) -> None:
    worker = RecordingWorker()
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        await coord.pause("acme", "ingest")
        assert await coord.submit([make_event(f"e{i}") for i in range(10)]) == ["accepted"] * 10
        held = await flow_counts(coord)
        assert (held["paused"], held["queued"], held["runs"]["pending"]) == (True, 10, 10)
        assert worker.calls == []
        await coord.resume("acme", "ingest")
        await wait_for(all_in_state(coord, 10, "completed"))
        assert (await flow_counts(coord))["paused"] is False
    assert sorted(worker.ids()) == sorted(f"e{i}" for i in range(10))


async def test_pause_survives_a_coordinator_restart(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    async with running(make_coordinator(db, [RecordingWorker()])) as first:
        await first.pause("acme", "ingest")
        await first.submit([make_event("e1")])
    worker = RecordingWorker()
    async with running(make_coordinator(db, [worker])) as second:
        assert (await flow_counts(second))["queued"] == 1
        assert worker.calls == []
        await second.resume("acme", "ingest")
        await wait_for(all_in_state(second, 1, "completed"))
    assert worker.calls == [("e1", 1)]


async def test_pause_of_an_unknown_flow_is_a_key_error(tmp_path: Path) -> None:
    async with running(make_coordinator(tmp_path / "ledger.db", [RecordingWorker()])) as coord:
        with pytest.raises(KeyError, match="unknown flow acme/nope"):
            await coord.pause("acme", "nope")
        with pytest.raises(KeyError):
            await coord.resume("zzz", "ingest")


# -- retries and dead letters --------------------------------------------------------------
async def test_flow_failing_twice_completes_on_attempt_three(tmp_path: Path) -> None:
    worker = flow_worker(flows_unit.flaky_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=3)) as coord:
        await coord.submit([make_event("e1", payload={"succeed_on": 3})])
        await wait_for(all_in_state(coord, 1, "completed"))
        run = (await runs_by_id(coord))["e1"]
    assert calls() == {"e1": [1, 2, 3]}
    assert (run["attempts"], run["error"]) == (3, None)


async def test_worker_that_raises_counts_as_a_failed_attempt(tmp_path: Path) -> None:
    worker = RecordingWorker(raise_first=1)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker])) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "completed"))
    assert worker.calls == [("e1", 1), ("e1", 2)]


async def test_exhausted_retries_go_dead_with_the_error(tmp_path: Path) -> None:
    flows_unit.BROKEN.add("e1")
    worker = flow_worker(flows_unit.breakable_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=2)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "dead"))
        (dead,) = await coord.runs(state="dead")
        counts = await flow_counts(coord)
    assert calls() == {"e1": [1, 2, 3]}
    assert dead["attempts"] == 3
    assert dead["error"] == "ValueError: e1 is broken"
    assert counts["runs"]["dead"] == 1


async def test_dead_letter_replay_runs_again_and_completes(tmp_path: Path) -> None:
    flows_unit.BROKEN.add("e1")
    worker = flow_worker(flows_unit.breakable_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=1)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "dead"))
        flows_unit.BROKEN.clear()
        assert await coord.replay(["e1"]) == ["acme/ingest/e1"]
        await wait_for(all_in_state(coord, 1, "completed"))
        run = (await runs_by_id(coord))["e1"]
    assert calls() == {"e1": [1, 2, 1]}
    assert (run["attempts"], run["error"]) == (1, None)


async def test_replayed_event_that_succeeded_is_not_rerun_by_later_duplicates(
    tmp_path: Path,
) -> None:
    flows_unit.BROKEN.add("e1")
    worker = flow_worker(flows_unit.breakable_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=0)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "dead"))
        flows_unit.BROKEN.clear()
        await coord.replay(["acme/ingest/e1"])
        await wait_for(all_in_state(coord, 1, "completed"))
        assert await coord.submit([make_event("e1"), make_event("e2")]) == [
            "duplicate",
            "accepted",
        ]
        assert await coord.replay(["e1"]) == []
        await wait_for(all_in_state(coord, 2, "completed"))
    assert calls() == {"e1": [1, 1], "e2": [1]}


async def test_replayed_run_reaches_the_worker_as_a_new_series(tmp_path: Path) -> None:
    worker = RecordingWorker(fail_first=1)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=0)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "dead"))
        await coord.replay(["e1"])
        await wait_for(lambda: len(worker.calls) == 2)
        await wait_for(all_in_state(coord, 1, "dead"))
    assert worker.calls == [("e1", 1), ("e1", 1)]
    assert worker.series == [0, 1]


async def test_replay_without_ids_replays_every_dead_letter(tmp_path: Path) -> None:
    flows_unit.BROKEN.update({"a", "b"})
    worker = flow_worker(flows_unit.breakable_flow)
    async with running(make_coordinator(tmp_path / "ledger.db", [worker], retries=0)) as coord:
        await coord.submit([make_event("a"), make_event("b"), make_event("ok")])
        await wait_for(lambda: len(CALLS) == 3)
        await wait_for(lambda: _states_are(coord, {"a": "dead", "b": "dead", "ok": "completed"}))
        flows_unit.BROKEN.clear()
        assert sorted(await coord.replay()) == ["acme/ingest/a", "acme/ingest/b"]
        await wait_for(all_in_state(coord, 3, "completed"))
    assert calls() == {"a": [1, 1], "b": [1, 1], "ok": [1]}


async def _states_are(coord: Any, expected: dict[str, str]) -> bool:
    return await run_states(coord) == expected


def test_backoff_doubles_per_attempt_with_jitter_and_a_cap() -> None:
    policy = FlowPolicy("acme", "ingest", retry_delay=1.0, max_retry_delay=5.0)
    assert [policy.backoff(n, lambda: 0.5) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert policy.backoff(1, lambda: 0.0) == 0.5
    assert policy.backoff(2, lambda: 0.999) == pytest.approx(2 * 1.499)


# -- restarts ------------------------------------------------------------------------------
async def test_new_coordinator_over_same_ledger_dispatches_pending_runs(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    gate = asyncio.Event()
    stuck = RecordingWorker(gate=gate)
    first = make_coordinator(db, [stuck], tenants=[TenantPolicy("acme", max_concurrent_runs=1)])
    async with running(first):
        await first.submit([make_event(f"e{i}") for i in range(4)])
        await wait_for(lambda: stuck.running == 1)
        await first.stop(drain_timeout=0)
    worker = RecordingWorker()
    async with running(make_coordinator(db, [worker])) as second:
        await wait_for(all_in_state(second, 4, "completed"))
        runs = await runs_by_id(second)
    assert sorted(worker.calls) == [(f"e{i}", 1) for i in range(4)]
    assert {r["attempts"] for r in runs.values()} == {1}


async def test_run_left_running_is_resent_with_the_same_attempt_number(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    stuck = RecordingWorker(gate=asyncio.Event())
    async with running(make_coordinator(db, [stuck], retries=3)) as first:
        await first.submit([make_event("e1")])
        await wait_for(all_in_state(first, 1, "running"))
        assert await first.stop(drain_timeout=0) == 1
    assert stuck.calls == [("e1", 1)]
    worker = RecordingWorker()
    async with running(make_coordinator(db, [worker])) as second:
        await wait_for(all_in_state(second, 1, "completed"))
        run = (await runs_by_id(second))["e1"]
    assert worker.calls == [("e1", 1)]
    assert run["attempts"] == 1


async def test_run_resent_after_restart_is_not_run_twice_by_its_worker(tmp_path: Path) -> None:
    """The worker outlives the coordinator: the resent attempt joins the one in flight."""
    db = tmp_path / "ledger.db"
    flows_unit.GATE = asyncio.Event()
    worker = flow_worker(flows_unit.gated_flow)
    async with running(make_coordinator(db, [worker])) as first:
        await first.submit([make_event("e1")])
        await wait_for(lambda: calls() == {"e1": [1]})
        await first.stop(drain_timeout=0)
    async with running(make_coordinator(db, [worker])) as second:
        flows_unit.GATE.set()
        await wait_for(all_in_state(second, 1, "completed"))
    assert calls() == {"e1": [1]}
    assert worker.runs_started == 1


async def test_failed_run_waiting_for_its_retry_resumes_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    failing = RecordingWorker(fail_first=1)
    async with running(make_coordinator(db, [failing], retry_delay=0.5)) as first:
        await first.submit([make_event("e1")])
        await wait_for(all_in_state(first, 1, "failed"))
        await first.stop(drain_timeout=0)
    worker = RecordingWorker()
    async with running(make_coordinator(db, [worker])) as second:
        await wait_for(all_in_state(second, 1, "completed"))
        run = (await runs_by_id(second))["e1"]
    assert failing.calls == [("e1", 1)]
    assert worker.calls == [("e1", 2)]
    assert run["attempts"] == 2


async def test_duplicate_event_after_coordinator_restart_runs_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    worker = RecordingWorker()
    async with running(make_coordinator(db, [worker])) as first:
        await first.submit([make_event("e1")])
        await wait_for(all_in_state(first, 1, "completed"))
    async with running(make_coordinator(db, [worker])) as second:
        assert await second.submit([make_event("e1"), make_event("e2")]) == [
            "duplicate",
            "accepted",
        ]
        await wait_for(all_in_state(second, 2, "completed"))
    assert worker.calls == [("e1", 1), ("e2", 1)]


async def test_starting_twice_dispatches_restored_runs_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SQLiteLedger(db)
    await ledger.claim([make_event("e1"), make_event("e2")])
    await ledger.close()
    worker = RecordingWorker()
    second = make_coordinator(db, [worker])
    async with running(second):
        await asyncio.gather(second.start(), second.start(), second.ping())
        await wait_for(all_in_state(second, 2, "completed"))
    assert sorted(worker.calls) == [("e1", 1), ("e2", 1)]


def test_a_coordinator_needs_a_worker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        make_coordinator(tmp_path / "ledger.db", [])


# -- packed intake (what a host sends through Ray) -----------------------------------------
async def submit_packed(coord: Any, events: list[Any]) -> list[str]:
    """What a host's handle does: runs of one flow over the wire, answers in input order."""
    batches, order = batches_of(events)
    return in_input_order(await coord.submit_packed(pack_batches(batches), []), order)


async def test_a_packed_batch_gets_the_outcomes_and_rows_of_the_same_events_unpacked(
    tmp_path: Path,
) -> None:
    tenants = [TenantPolicy("acme"), TenantPolicy("beta")]
    batches = [
        [make_event("a0"), make_event("a1"), make_event("a0"), make_event("x", flow="nope")],
        [make_event("a1"), make_event("b0", tenant="beta"), make_event("a2"), make_event("a3")],
    ]
    answers, stored = [], []
    for packed in (False, True):
        worker = RecordingWorker()
        coord = make_coordinator(
            tmp_path / f"{packed}.db", [worker], flows=TWO_TENANTS, tenants=tenants
        )
        async with running(coord):
            answers.append(
                [await (submit_packed(coord, b) if packed else coord.submit(b)) for b in batches]
            )
            await wait_for(all_in_state(coord, 5, "completed"))
            stored.append(sorted((r.key, r.event) for r in await coord.ledger.runs()))
            counts = await flow_counts(coord)
        assert sorted(worker.ids()) == ["a0", "a1", "a2", "a3", "b0"]
        assert counts["events"] == {"seen": 6, "accepted": 4, "duplicate": 2, "rejected": 0}
    assert (
        answers[0]
        == answers[1]
        == [
            ["accepted", "accepted", "duplicate", "rejected:unknown_flow"],
            ["duplicate", "accepted", "accepted", "accepted"],
        ]
    )
    assert stored[0] == stored[1]
