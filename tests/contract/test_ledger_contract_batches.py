"""More of the ledger contract, run against every backend: paging pending events, grouped
starts, repeated outcomes, bounded rejections, replay order, racing writers, large batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from actors.claims import batches_of, flow_batch
from actors.ledger import Finish, Ledger, RejectionRecord
from tests.contract.ledgers import KEY, Store, dead, fail, ledger, make_event, state_of, stores

__all__ = ["ledger", "stores"]  # fixtures: stores is parametrized over the backends


async def test_pending_pages_the_oldest_events_of_one_flow(ledger: Ledger) -> None:
    await ledger.claim([make_event("b"), make_event("a"), make_event("x", flow="other")])
    await ledger.claim([make_event("c")])
    await ledger.start(("acme", "ingest", "a"), 0)
    assert [e.id for e in await ledger.pending("acme", "ingest", 10)] == ["b", "c"]
    assert [e.id for e in await ledger.pending("acme", "ingest", 1)] == ["b"]
    assert [e.id for e in await ledger.pending("acme", "other", 10)] == ["x"]
    assert await ledger.pending("beta", "ingest", 10) == []


async def test_start_many_starts_each_startable_run_once(ledger: Ledger) -> None:
    await ledger.claim([make_event("a"), make_event("b"), make_event("done")])
    done = ("acme", "ingest", "done")
    await ledger.start(done, 0)
    await ledger.finish([Finish(done, 1, ok=True)])
    a, b = ("acme", "ingest", "a"), ("acme", "ingest", "b")
    missing = ("acme", "ingest", "missing")
    started = await ledger.start_many([(a, 1), (b, 2), (a, 3), (done, 4), (missing, 5)])
    assert started == [(1, 0), (1, 0), None, None, None]
    workers = {r.event.id: r.worker for r in await ledger.runs(state="running")}
    assert workers == {"a": 1, "b": 2}
    assert await ledger.start_many([]) == []


async def test_start_batch_records_the_batch_on_every_member(ledger: Ledger) -> None:
    await ledger.claim([make_event("a"), make_event("b")])
    keys = [("acme", "ingest", "a"), ("acme", "ingest", "b"), ("acme", "ingest", "nope")]
    assert await ledger.start_batch(keys, 7, "batch-1") == [(1, 0), (1, 0), None]
    assert {(r.event.id, r.worker, r.batch) for r in await ledger.open_runs()} == {
        ("a", 7, "batch-1"),
        ("b", 7, "batch-1"),
    }


async def test_a_repeated_outcome_in_one_finish_is_stale(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    assert await ledger.finish([Finish(KEY, 1, ok=True), fail(1)]) == [True, False]
    assert await state_of(ledger) == ("completed", 1)
    assert await ledger.finish([]) == []


async def test_open_runs_without_pending_are_running_and_failed(ledger: Ledger) -> None:
    await ledger.claim([make_event("p"), make_event("r"), make_event("f")])
    await ledger.start_many([(("acme", "ingest", "r"), 0), (("acme", "ingest", "f"), 0)])
    await ledger.finish([fail(1, key=("acme", "ingest", "f"))])
    opened = await ledger.open_runs(include_pending=False)
    assert sorted((r.event.id, r.state.value) for r in opened) == [
        ("f", "failed"),
        ("r", "running"),
    ]


async def test_only_the_newest_rejections_are_kept(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors.ledger.postgres as pg
    import actors.ledger.redis as rd
    import actors.ledger.sqlite as lite

    for module in (lite, pg, rd):
        monkeypatch.setattr(module, "MAX_REJECTIONS_KEPT", 3)
    for i in range(5):
        await ledger.reject([RejectionRecord("acme", "ingest", "file", "malformed", f"#{i}")])
    assert [r.detail for r in await ledger.rejections()] == ["#4", "#3", "#2"]
    assert (await ledger.counts())[("acme", "ingest")].events["rejected"] == 5


async def test_a_long_rejection_detail_is_cut(ledger: Ledger) -> None:
    await ledger.reject([RejectionRecord("acme", "ingest", "file", "malformed", "x" * 5000)])
    (r,) = await ledger.rejections()
    assert len(r.detail) == 2000


async def test_replay_returns_events_in_the_order_asked_and_each_once(ledger: Ledger) -> None:
    for event_id in ("d1", "d2", "d3"):
        await dead(ledger, event_id)
    keys = [("acme", "ingest", i) for i in ("d3", "d1", "d3")]
    assert [e.id for e in await ledger.replay(keys)] == ["d3", "d1"]
    assert await ledger.replay([]) == []


async def test_concurrent_claims_of_one_id_from_many_writers_accept_it_once(
    stores: Callable[[], Store],
) -> None:
    store = stores()
    writers = [store.open() for _ in range(8)]
    try:
        results = await asyncio.gather(
            *(w.claim([make_event("same"), make_event(f"own-{i}")]) for i, w in enumerate(writers))
        )
        assert sum(r[0] for r in results) == 1
        assert all(r[1] for r in results)
        events = (await writers[0].counts())[("acme", "ingest")].events
        assert events == {"seen": 16, "accepted": 9, "duplicate": 7, "rejected": 0}
    finally:
        for w in writers:
            await w.close()


async def test_a_large_batch_is_claimed_in_one_call(ledger: Ledger) -> None:
    events = [make_event(f"e{i}") for i in range(2500)]
    assert await ledger.claim(events + events[:10]) == [True] * 2500 + [False] * 10
    assert (await ledger.counts())[("acme", "ingest")].runs["pending"] == 2500


async def test_claim_batches_answers_per_run_and_stores_the_bytes_it_was_given(
    ledger: Ledger,
) -> None:
    await ledger.claim([make_event("old")])
    a = make_event("a", payload={"deep": [1, {"x": None}]})
    runs = [
        flow_batch("acme", "ingest", [a, make_event("old"), make_event("a")]),  # a repeat
        flow_batch("acme", "other", [make_event("x", flow="other")]),
        # A second batch of the first flow, in the same transaction.
        flow_batch("acme", "ingest", [make_event("b"), make_event("a")]),
    ]
    assert await ledger.claim_batches(runs) == [[True, False, False], [True], [True, False]]
    assert await ledger.claim_batches(runs) == [[False, False, False], [False], [False, False]]
    assert await ledger.claim_batches([]) == []
    stored = {r.event.id: r.event for r in await ledger.runs(flow="ingest")}
    assert stored["a"] == a
    assert [e.id for e in await ledger.pending("acme", "ingest", 10)] == ["old", "a", "b"]
    counts = (await ledger.counts())[("acme", "ingest")].events
    assert counts == {"seen": 11, "accepted": 3, "duplicate": 8, "rejected": 0}


async def test_claim_batches_of_a_big_run_inserts_each_new_event_once(ledger: Ledger) -> None:
    first, _ = batches_of([make_event(f"e{i:04d}") for i in range(0, 1500)])
    assert await ledger.claim_batches(first) == [[True] * 1500]
    # Half known, half new, interleaved: the answer follows the input order.
    mixed, _ = batches_of([make_event(f"e{i:04d}") for i in range(750, 2250)])
    assert await ledger.claim_batches(mixed) == [[False] * 750 + [True] * 750]
    assert (await ledger.counts())[("acme", "ingest")].runs["pending"] == 2250
