"""FlowWorker concurrency: async flows overlap on the worker's loop, sync flows of ALL its
flows share one bounded pool, tracked runs of all its flows share one set of clients and are
capped per worker."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

from actors.handles import RunOutcome
from actors.worker import FlowTarget, FlowWorker
from tests import flows_for_tests as flows
from tests.unit import flows_unit
from tests.unit.helpers import peak_overlap


def event(flow: str, **payload: Any) -> dict[str, Any]:
    return {
        "id": f"ev-{uuid.uuid4().hex[:10]}",
        "tenant": "acme",
        "flow": flow,
        "source": "test",
        "type": "test",
        "occurred": "2024-01-01T00:00:00+00:00",
        "payload": payload,
    }


async def test_sync_flows_of_all_targets_share_one_bounded_pool() -> None:
    worker = FlowWorker(
        0,
        [
            FlowTarget("acme", "a", flow_obj=flows.sleepy_flow),
            FlowTarget("acme", "b", flow_obj=flows.sleepy_flow),
        ],
        max_threads=2,
    )
    try:
        events = [event("a" if i % 2 else "b", sleep=0.2) for i in range(8)]
        outcomes = await asyncio.gather(*(worker.run(e, 1) for e in events))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        threads = {flows.SEEN[e["id"]]["thread"] for e in events}
        assert len(threads) <= 2 and all(t.startswith("worker-0") for t in threads)
        # Two flows, one pool of 2: never more than 2 sync runs at once in the worker.
        assert 1 < peak_overlap(outcomes) <= 2
    finally:
        await worker.stop()


async def test_async_flows_run_concurrently_on_the_loop() -> None:
    flows_unit.reset()
    flows_unit.GATE = asyncio.Event()
    worker = FlowWorker(0, [FlowTarget("acme", "g", flow_obj=flows_unit.gated_flow)])
    try:
        events = [event("g") for _ in range(40)]  # more than any thread pool of the worker
        runs = [asyncio.create_task(worker.run(e, 1)) for e in events]
        for _ in range(500):
            if len(flows_unit.CALLS) == len(events):
                break
            await asyncio.sleep(0.01)
        # All 40 are inside the flow body at once, waiting on the same gate.
        assert len(flows_unit.CALLS) == len(events)
        assert not any(r.done() for r in runs)
        flows_unit.GATE.set()
        outcomes = await asyncio.gather(*runs)
        assert all(o.ok for o in outcomes)
    finally:
        flows_unit.reset()
        await worker.stop()


async def test_tracked_runners_of_a_worker_share_its_clients(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never called here
    worker = FlowWorker(
        0,
        [
            FlowTarget("acme", "a", flow_obj=flows.sync_flow),
            FlowTarget("acme", "b", flow_obj=flows.async_flow),
        ],
        tracking="api",
    )
    try:
        assert await worker.start() == {}
        runners = list(worker._runners.values())
        assert len(runners) == 2
        assert all(r.clients is worker.clients for r in runners)
        assert len({id(r._pool) for r in runners}) == 1
    finally:
        await worker.stop()
    assert worker.clients.opened() == []


async def test_tracked_runs_in_flight_are_capped_per_worker(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never called here
    worker = FlowWorker(
        0,
        [
            FlowTarget("acme", "a", flow_obj=flows.sync_flow),
            FlowTarget("acme", "b", flow_obj=flows.async_flow),
        ],
        tracking="api",
        max_threads=8,
        tracked_concurrency=2,
    )
    running = peak = 0

    async def fake_run(event: dict[str, Any], attempt: int) -> RunOutcome:
        # Stands in for a tracked run (no Prefect server here): only the gating is tested.
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return RunOutcome(ok=True)

    try:
        await worker.start()
        for runner in worker._runners.values():
            monkeypatch.setattr(runner, "run", fake_run)
        events = [event("a" if i % 2 else "b") for i in range(8)]
        outcomes = await asyncio.gather(*(worker.run(e, 1) for e in events))
        assert all(o.ok for o in outcomes)
        assert peak == 2  # both flows together, never more than the cap
        assert worker.runs_started == 8
    finally:
        await worker.stop()


async def test_untracked_runs_are_not_capped_by_the_tracked_limit() -> None:
    flows_unit.reset()
    flows_unit.GATE = asyncio.Event()
    worker = FlowWorker(
        0, [FlowTarget("acme", "g", flow_obj=flows_unit.gated_flow)], tracked_concurrency=1
    )
    try:
        runs = [asyncio.create_task(worker.run(event("g"), 1)) for _ in range(5)]
        for _ in range(500):
            if len(flows_unit.CALLS) == 5:
                break
            await asyncio.sleep(0.01)
        assert len(flows_unit.CALLS) == 5  # all in the flow body at once
        flows_unit.GATE.set()
        assert all(o.ok for o in await asyncio.gather(*runs))
    finally:
        flows_unit.reset()
        await worker.stop()


async def test_an_attempt_begun_by_a_dead_incarnation_is_failed_not_run_again(tmp_path) -> None:
    flows_unit.reset()
    journal = tmp_path / "worker-0.journal"
    target = [FlowTarget("acme", "rec", flow_obj=flows_unit.record_flow)]
    ev = event("rec")
    first = FlowWorker(0, target, journal=journal)
    assert (await first.run(ev, 1)).ok
    assert (await first.run(ev, 1)).ok  # same incarnation: the remembered outcome
    # The worker process dies (nothing is closed) and Ray starts a new one; a restarted
    # coordinator re-sends attempt 1, which the new incarnation must not run again.
    second = FlowWorker(0, target, journal=journal)
    again = await second.run(ev, 1)
    assert not again.ok and "restarted during attempt 1" in (again.error or "")
    assert (await second.run(ev, 2)).ok  # the coordinator's retry is a new attempt
    assert flows_unit.CALLS[ev["id"]] == [1, 2]
    # A replay (new series) of the same attempt number is a new attempt too.
    assert (await second.run(ev, 1, series=1)).ok
    await second.stop()


async def test_a_torn_journal_line_is_skipped(tmp_path) -> None:
    journal = tmp_path / "worker-0.journal"
    journal.write_text('["acme", "rec", "e1", 0, 1]\n["acme", "r')
    worker = FlowWorker(0, [], journal=journal)
    assert worker.journal.began_before(("acme", "rec", "e1", 0, 1))
    assert not worker.journal.began_before(("acme", "rec", "e2", 0, 1))
    await worker.stop()


async def test_a_freezing_worker_moves_the_heap_out_of_gc_reach_once_per_loaded_flow() -> None:
    worker = FlowWorker(
        0,
        [
            FlowTarget("acme", "a", flow_obj=flows.sleepy_flow),
            FlowTarget("acme", "b", flow_obj=flows.sleepy_flow),
        ],
        freeze_gc=True,
    )
    gc.unfreeze()
    try:
        assert (await worker.run(event("a", sleep=0), 1)).ok
        frozen = gc.get_freeze_count()
        assert frozen > 0
        gc.unfreeze()  # a second run of a loaded flow freezes nothing more
        assert (await worker.run(event("a", sleep=0), 1)).ok
        assert gc.get_freeze_count() == 0
        assert (await worker.run(event("b", sleep=0), 1)).ok  # a newly loaded flow does
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        await worker.stop()
