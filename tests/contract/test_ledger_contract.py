"""The ledger contract, run against every backend (SQLite, PostgreSQL, Redis): claims, counters,
run transitions, dead letters, flow state, and durability across reopening the store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from actors.ledger import Finish, Ledger, RejectionRecord, RunState, open_ledger
from actors.ledger.target import default_namespace
from tests.contract.ledgers import (
    KEY,
    PG_URL,
    REDIS_URL,
    Store,
    dead,
    drop_store,
    fail,
    ledger,
    make_event,
    require_postgres,
    require_redis,
    state_of,
    stores,
)

__all__ = ["ledger", "stores"]  # fixtures: stores is parametrized over the backends


# -- claims and counters -------------------------------------------------------------------
async def test_claim_marks_new_events_and_stores_them_pending(ledger: Ledger) -> None:
    assert await ledger.claim([make_event("e1"), make_event("e2")]) == [True, True]
    assert sorted((r.event.id, r.state) for r in await ledger.runs()) == [
        ("e1", RunState.PENDING),
        ("e2", RunState.PENDING),
    ]


async def test_claim_of_an_empty_batch_does_nothing(ledger: Ledger) -> None:
    assert await ledger.claim([]) == []
    assert await ledger.counts() == {}


async def test_second_claim_of_same_id_is_a_duplicate(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    assert await ledger.claim([make_event("e1"), make_event("e2")]) == [False, True]


async def test_same_id_twice_in_one_batch_is_new_once(ledger: Ledger) -> None:
    assert await ledger.claim([make_event("e1"), make_event("e1")]) == [True, False]


async def test_same_id_in_different_flows_or_tenants_is_distinct(ledger: Ledger) -> None:
    events = [make_event("e1"), make_event("e1", flow="other"), make_event("e1", tenant="beta")]
    assert await ledger.claim(events) == [True, True, True]


async def test_claims_count_seen_accepted_and_duplicate_per_flow(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1"), make_event("e2"), make_event("x", flow="other")])
    await ledger.claim([make_event("e1"), make_event("e3")])
    counts = await ledger.counts()
    assert counts[("acme", "ingest")].events == {
        "seen": 4,
        "accepted": 3,
        "duplicate": 1,
        "rejected": 0,
    }
    assert counts[("acme", "other")].events["accepted"] == 1
    assert counts[("acme", "ingest")].runs["pending"] == 3
    assert counts[("acme", "ingest")].last_event_at is not None


async def test_claim_stores_the_events_wire_bytes_when_given(ledger: Ledger) -> None:
    events = [make_event(f"w{i}", payload={"i": i}) for i in range(3)] + [make_event("w0")]
    packed = [bytearray(msgpack.packb(e.to_wire(), use_bin_type=True)) for e in events]
    assert await ledger.claim(events, packed) == [True, True, True, False]
    stored = {r.event.id: r.event for r in await ledger.runs()}
    assert stored == {e.id: e for e in events[:3]}


async def test_claimed_event_is_stored_whole(ledger: Ledger) -> None:
    ev = make_event("e1", payload={"deep": {"list": [1, 2.5, None]}})
    ev.received = 123.0
    await ledger.claim([ev])
    (rec,) = await ledger.runs()
    assert rec.event == ev


async def test_rejections_are_counted_by_reason_and_listed(ledger: Ledger) -> None:
    await ledger.reject(
        [
            RejectionRecord("acme", "ingest", "file", "malformed", "bad json", ref="/a.json"),
            RejectionRecord("acme", "ingest", "file", "malformed", "bad json", ref="/b.json"),
            RejectionRecord("acme", "ingest", "webhook", "too_large", "2 MiB"),
        ]
    )
    c = (await ledger.counts())[("acme", "ingest")]
    assert c.events["rejected"] == 3
    assert c.rejected_by_reason == {"malformed": 2, "too_large": 1}
    listed = await ledger.rejections()
    assert [(r.reason, r.ref) for r in listed] == [
        ("too_large", ""),
        ("malformed", "/b.json"),
        ("malformed", "/a.json"),
    ]
    assert all(r.at > 0 for r in listed)


async def test_reject_of_nothing_counts_nothing(ledger: Ledger) -> None:
    await ledger.reject([])
    assert await ledger.counts() == {}


# -- run transitions -----------------------------------------------------------------------
async def test_start_moves_pending_to_running_as_attempt_one(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    assert await ledger.start(KEY, worker=3) == (1, 0)
    (rec,) = await ledger.runs()
    assert (rec.state, rec.attempts, rec.worker) == (RunState.RUNNING, 1, 3)


async def test_a_running_run_cannot_be_started_again(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    assert await ledger.start(KEY, 1) is None
    assert await state_of(ledger) == ("running", 1)


async def test_start_of_an_unknown_key_is_refused(ledger: Ledger) -> None:
    assert await ledger.start(KEY, 0) is None


async def test_successful_finish_completes_and_keeps_flow_run_id(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    assert await ledger.finish([Finish(KEY, 1, ok=True, prefect_flow_run_id="fr-1")]) == [True]
    (rec,) = await ledger.runs()
    assert (rec.state, rec.prefect_flow_run_id, rec.error) == (RunState.COMPLETED, "fr-1", None)
    assert await ledger.start(KEY, 0) is None


async def test_failed_attempt_with_retry_is_failed_then_restartable(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    assert await ledger.finish([fail(1)]) == [True]
    (rec,) = await ledger.runs()
    assert (rec.state, rec.error, rec.next_at) == (RunState.FAILED, "boom", 1.0)
    assert await ledger.start(KEY, 0) == (2, 0)
    assert await state_of(ledger) == ("running", 2)


async def test_failed_attempt_without_retry_is_dead(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    await ledger.finish([fail(1, retry=False)])
    assert await state_of(ledger) == ("dead", 1)
    assert await ledger.start(KEY, 0) is None


async def test_stale_finish_of_an_earlier_attempt_is_refused(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    await ledger.start(KEY, 0)
    await ledger.finish([fail(1)])
    await ledger.start(KEY, 0)
    assert await ledger.finish([Finish(KEY, 1, ok=True)]) == [False]
    assert await state_of(ledger) == ("running", 2)


async def test_finish_of_a_run_that_is_not_running_is_refused(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    assert await ledger.finish([Finish(KEY, 0, ok=True)]) == [False]
    assert await state_of(ledger) == ("pending", 0)


async def test_finish_reports_each_result_of_a_batch(ledger: Ledger) -> None:
    other = ("acme", "ingest", "e2")
    await ledger.claim([make_event("e1"), make_event("e2")])
    await ledger.start(KEY, 0)
    assert await ledger.finish([Finish(KEY, 1, ok=True), Finish(other, 1, ok=True)]) == [
        True,
        False,
    ]


async def test_open_runs_are_pending_running_and_failed_in_claim_order(
    ledger: Ledger,
) -> None:
    await ledger.claim([make_event(i) for i in ("p", "r", "f", "c", "d")])
    for event_id in ("r", "f", "c", "d"):
        await ledger.start(("acme", "ingest", event_id), 0)
    await ledger.finish(
        [
            fail(1, key=("acme", "ingest", "f")),
            Finish(("acme", "ingest", "c"), 1, ok=True),
            fail(1, retry=False, key=("acme", "ingest", "d")),
        ]
    )
    assert sorted((r.event.id, r.state.value) for r in await ledger.open_runs()) == [
        ("f", "failed"),
        ("p", "pending"),
        ("r", "running"),
    ]


async def test_runs_filter_by_tenant_flow_and_state(ledger: Ledger) -> None:
    await ledger.claim([make_event("a"), make_event("b", flow="other"), make_event("c", "beta")])
    await ledger.start(("acme", "ingest", "a"), 0)
    assert [r.event.id for r in await ledger.runs(tenant="beta")] == ["c"]
    assert [r.event.id for r in await ledger.runs(flow="other")] == ["b"]
    assert [r.event.id for r in await ledger.runs(state="running")] == ["a"]
    assert len(await ledger.runs(limit=2)) == 2


async def test_run_record_dict_has_the_cli_shape(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    (rec,) = await ledger.runs()
    d = rec.to_dict()
    assert {k: d[k] for k in ("tenant", "flow", "event_id", "state", "attempts")} == {
        "tenant": "acme",
        "flow": "ingest",
        "event_id": "e1",
        "state": "pending",
        "attempts": 0,
    }
    assert d["prefect_flow_run_id"] is None


# -- dead letters --------------------------------------------------------------------------
async def test_replay_moves_dead_to_pending_with_attempts_reset(ledger: Ledger) -> None:
    await dead(ledger, "e1")
    (ev,) = await ledger.replay([KEY])
    assert ev.id == "e1"
    (rec,) = await ledger.runs()
    assert (rec.state, rec.attempts, rec.series, rec.error) == (RunState.PENDING, 0, 1, None)
    assert await ledger.start(KEY, 0) == (1, 1)


async def test_replay_of_all_replays_only_dead_runs(ledger: Ledger) -> None:
    await dead(ledger, "d1")
    await dead(ledger, "d2")
    await ledger.claim([make_event("pending")])
    replayed = await ledger.replay(None)
    assert sorted(e.id for e in replayed) == ["d1", "d2"]
    assert await ledger.replay(None) == []


async def test_replay_ignores_keys_that_are_not_dead(ledger: Ledger) -> None:
    await ledger.claim([make_event("e1")])
    assert await ledger.replay([KEY, ("acme", "ingest", "nope")]) == []
    assert await state_of(ledger) == ("pending", 0)


# -- flow state and durability -------------------------------------------------------------
async def test_paused_flows_are_remembered_and_can_be_resumed(ledger: Ledger) -> None:
    await ledger.set_paused("acme", "ingest", True)
    await ledger.set_paused("acme", "other", True)
    await ledger.set_paused("acme", "other", False)
    assert await ledger.paused() == {("acme", "ingest")}


async def test_everything_survives_closing_and_reopening_the_store(
    stores: Callable[[], Store],
) -> None:
    store = stores()
    first = store.open()
    await first.claim([make_event("e1"), make_event("e2")])
    await first.start(KEY, 0)
    await first.set_paused("acme", "ingest", True)
    await first.close()

    again = store.open()
    try:
        assert await again.claim([make_event("e1")]) == [False]
        assert sorted((r.event.id, r.state.value, r.attempts) for r in await again.runs()) == [
            ("e1", "running", 1),
            ("e2", "pending", 0),
        ]
        assert await again.paused() == {("acme", "ingest")}
        assert (await again.counts())[("acme", "ingest")].events["duplicate"] == 1
    finally:
        await again.close()


async def test_two_connections_on_one_store_claim_each_id_once(
    stores: Callable[[], Store],
) -> None:
    store = stores()
    a, b = store.open(), store.open()
    try:
        assert await a.claim([make_event("e1")]) == [True]
        assert await b.claim([make_event("e1"), make_event("e2")]) == [False, True]
        assert await a.claim([make_event("e2")]) == [False]
    finally:
        await a.close()
        await b.close()


async def test_two_stores_do_not_see_each_others_events(stores: Callable[[], Store]) -> None:
    a, b = stores().open(), stores().open()
    try:
        assert await a.claim([make_event("e1")]) == [True]
        assert await b.claim([make_event("e1")]) == [True]
        assert [r.event.id for r in await b.runs()] == ["e1"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("backend", ["postgresql", "redis"])
async def test_clusters_with_different_state_dirs_share_a_server_apart(
    backend: str, tmp_path: Path
) -> None:
    (require_postgres if backend == "postgresql" else require_redis)()
    url = PG_URL if backend == "postgresql" else REDIS_URL
    dirs = [tmp_path / "one", tmp_path / "two"]
    try:
        one, two = (open_ledger(url, d) for d in dirs)
        assert await one.claim([make_event("e1")]) == [True]
        assert await two.claim([make_event("e1")]) == [True]
        await one.close()
        await two.close()
        again = open_ledger(url, dirs[0])  # the same state dir finds its ledger again
        assert await again.claim([make_event("e1"), make_event("e2")]) == [False, True]
        await again.close()
    finally:
        for d in dirs:
            await drop_store(backend, default_namespace(d))
