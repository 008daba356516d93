"""Batch delivery: one run receives several events; exactly-once still holds per member."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import RecordingWorker, all_in_state, make_coordinator, make_event, running, wait_for

from actors.batching import BatchPolicy, batch_id
from actors.coordinator import FlowPolicy


def batch_flow(max_events: int = 3, max_wait: float = 0.2, retries: int = 3) -> FlowPolicy:
    return FlowPolicy(
        "acme",
        "ingest",
        retries=retries,
        retry_delay=0.01,
        batch=BatchPolicy(max_events=max_events, max_wait=max_wait),
    )


def test_batch_id_is_stable_for_the_same_members_in_any_order() -> None:
    a, b = make_event("a"), make_event("b")
    assert batch_id([a, b]) == batch_id([b, a]) != batch_id([a])


async def test_full_batches_run_at_once_and_the_rest_after_max_wait(tmp_path: Path) -> None:
    worker = RecordingWorker()
    coord = make_coordinator(tmp_path / "l.db", [worker], flows=[batch_flow(3, 0.3)])
    async with running(coord):
        await coord.submit([make_event(f"e{i}") for i in range(7)])
        await wait_for(all_in_state(coord, 7, "completed"), timeout=5)
    sizes = sorted(e["payload"]["size"] for e in worker.events)
    assert sizes == [1, 3, 3]
    members = [m["id"] for e in worker.events for m in e["payload"]["events"]]
    assert sorted(members) == sorted(f"e{i}" for i in range(7))
    assert all(e["type"] == "batch" and e["id"].startswith("batch:") for e in worker.events)


async def test_duplicates_never_join_a_second_batch(tmp_path: Path) -> None:
    worker = RecordingWorker()
    coord = make_coordinator(tmp_path / "l.db", [worker], flows=[batch_flow(2, 0.05)])
    async with running(coord):
        assert await coord.submit([make_event("x"), make_event("y")]) == ["accepted"] * 2
        await wait_for(all_in_state(coord, 2, "completed"))
        assert await coord.submit([make_event("x"), make_event("y")]) == ["duplicate"] * 2
        await asyncio.sleep(0.2)
    assert len(worker.events) == 1


async def test_a_failed_batch_retries_its_members_and_they_complete_once(tmp_path: Path) -> None:
    worker = RecordingWorker(fail_first=1)
    coord = make_coordinator(tmp_path / "l.db", [worker], flows=[batch_flow(2, 0.05)])
    async with running(coord):
        await coord.submit([make_event("p"), make_event("q")])
        await wait_for(all_in_state(coord, 2, "completed"), timeout=5)
        runs = {r["event_id"]: r["attempts"] for r in await coord.runs()}
    assert runs == {"p": 2, "q": 2}


async def test_restarted_coordinator_resends_a_running_batch_with_the_same_id(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    first = RecordingWorker(gate=gate)
    coord = make_coordinator(tmp_path / "l.db", [first], flows=[batch_flow(2, 0.05)])
    await coord.start()
    await coord.submit([make_event("m1"), make_event("m2")])
    await wait_for(lambda: len(first.events) == 1)
    await coord.stop(drain_timeout=0)  # dies with the batch running
    await coord.ledger.close()
    second = RecordingWorker()
    again = make_coordinator(tmp_path / "l.db", [second], flows=[batch_flow(2, 0.05)])
    async with running(again):
        await wait_for(all_in_state(again, 2, "completed"))
    assert second.events[0]["id"] == first.events[0]["id"]
    assert second.calls[0][1] == first.calls[0][1]  # the same attempt, not a new one
