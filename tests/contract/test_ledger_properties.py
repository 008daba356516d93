"""Properties of every ledger backend: idempotent claims (in sequence and racing from many
connections) and the run state machine against a model."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from actors.event import Event
from actors.ledger import Finish, FlowCounts
from tests.contract.ledgers import Store, make_event, stores

__all__ = ["stores"]  # the fixture, parametrized over the backends

T = TypeVar("T")
FLOWS = [("acme", "ingest"), ("acme", "other"), ("beta", "ingest")]
IDS = st.sampled_from(["a", "b", "c", "d", "e"])
CLAIM = st.tuples(st.sampled_from(FLOWS), IDS)
BATCHES = st.lists(st.lists(CLAIM, min_size=0, max_size=8), min_size=1, max_size=6)
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def events_of(batch: list[tuple[tuple[str, str], str]]) -> list[Event]:
    return [make_event(event_id, tenant, flow) for (tenant, flow), event_id in batch]


def counts_of(store: Store) -> dict[tuple[str, str], FlowCounts]:
    """The store's counts, read on a connection of its own (one event loop per connection)."""

    async def read() -> dict[tuple[str, str], FlowCounts]:
        ledger = store.open()
        try:
            return await ledger.counts()
        finally:
            await ledger.close()

    return asyncio.run(read())


def check_claims(
    batches: list[list[tuple[tuple[str, str], str]]],
    results: list[list[bool]],
    counts: dict[tuple[str, str], FlowCounts],
) -> None:
    """Exactly one ``new`` per key; counters: seen = accepted + duplicate, per flow."""
    new_per_key: Counter[tuple[str, str, str]] = Counter()
    seen_per_flow: Counter[tuple[str, str]] = Counter()
    for batch, result in zip(batches, results, strict=True):
        assert len(result) == len(batch)
        for ((tenant, flow), event_id), is_new in zip(batch, result, strict=True):
            new_per_key[(tenant, flow, event_id)] += is_new
            seen_per_flow[(tenant, flow)] += 1
    assert all(n == 1 for n in new_per_key.values()), new_per_key
    for fkey, seen in seen_per_flow.items():
        events = counts[fkey].events
        accepted = sum(1 for k in new_per_key if k[:2] == fkey)
        assert events["seen"] == seen
        assert events["accepted"] == accepted
        assert events["duplicate"] == seen - accepted
        assert events["seen"] == events["accepted"] + events["duplicate"]
        assert counts[fkey].runs["pending"] == accepted


@FAST
@given(batches=BATCHES)
def test_claims_in_sequence_yield_one_new_per_key(
    batches: list[list[tuple[tuple[str, str], str]]], stores: Callable[[], Store]
) -> None:
    store = stores()

    async def claim_all() -> list[list[bool]]:
        ledger = store.open()
        try:
            return [await ledger.claim(events_of(b)) for b in batches]
        finally:
            await ledger.close()

    check_claims(batches, asyncio.run(claim_all()), counts_of(store))


@settings(FAST, max_examples=15)
@given(batches=BATCHES)
def test_concurrent_claims_from_many_connections_yield_one_new_per_key(
    batches: list[list[tuple[tuple[str, str], str]]], stores: Callable[[], Store]
) -> None:
    """Each batch is claimed from its own thread and connection, all racing on one store."""
    store = stores()
    ledgers = [store.open() for _ in batches]
    results: list[list[bool]] = [[] for _ in batches]
    start = threading.Barrier(len(batches))

    async def claim_and_close(i: int) -> list[bool]:
        try:
            return await ledgers[i].claim(events_of(batches[i]))
        finally:
            await ledgers[i].close()

    def claim(i: int) -> None:
        start.wait()
        results[i] = asyncio.run(claim_and_close(i))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    check_claims(batches, results, counts_of(store))


# -- the run state machine -----------------------------------------------------------------
@dataclass
class Model:
    state: str = "pending"
    attempts: int = 0
    series: int = 0


class LedgerMachine(RuleBasedStateMachine):
    """Random claims, starts, finishes (current and stale attempts) and replays vs a model."""

    stores: Callable[[], Store]  # set by the test: makes a fresh store per run

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.ledger = type(self).stores().open()
        self.model: dict[tuple[str, str, str], Model] = {}
        self.workers = itertools.count()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.ledger.close())
        self.loop.close()

    @initialize(target=keys)
    def first_key(self) -> tuple[str, str, str]:
        return self.claim_key("a")

    @rule(target=keys, event_id=IDS)
    def claim(self, event_id: str) -> tuple[str, str, str]:
        return self.claim_key(event_id)

    def claim_key(self, event_id: str) -> tuple[str, str, str]:
        key = ("acme", "ingest", event_id)
        (is_new,) = self.run(self.ledger.claim([make_event(event_id)]))
        assert is_new == (key not in self.model)
        self.model.setdefault(key, Model())
        return key

    @rule(key=keys)
    def start(self, key: tuple[str, str, str]) -> None:
        m = self.model[key]
        started = self.run(self.ledger.start(key, next(self.workers)))
        if m.state in ("pending", "failed"):
            m.attempts += 1
            m.state = "running"
            assert started == (m.attempts, m.series)
        else:  # running, completed, dead: never a second running attempt
            assert started is None

    @rule(key=keys, ok=st.booleans(), retry=st.booleans(), stale_by=st.integers(0, 2))
    def finish(self, key: tuple[str, str, str], ok: bool, retry: bool, stale_by: int) -> None:
        m = self.model[key]
        attempt = m.attempts - stale_by
        retry_at = 1.0 if retry else None
        result = Finish(key, attempt, ok=ok, error=None if ok else "x", retry_at=retry_at)
        (fresh,) = self.run(self.ledger.finish([result]))
        if m.state == "running" and stale_by == 0:
            assert fresh
            m.state = "completed" if ok else ("failed" if retry else "dead")
        else:  # stale attempt, or nothing running: refused, nothing changes
            assert not fresh

    @rule(key=keys)
    def replay(self, key: tuple[str, str, str]) -> None:
        m = self.model[key]
        replayed = self.run(self.ledger.replay([key]))
        if m.state == "dead":
            assert [e.key for e in replayed] == [key]
            m.state, m.attempts, m.series = "pending", 0, m.series + 1
        else:
            assert replayed == []

    @invariant()
    def ledger_matches_model(self) -> None:
        records = {r.key: r for r in self.run(self.ledger.runs())}
        assert set(records) == set(self.model)
        for key, m in self.model.items():
            r = records[key]
            assert (r.state.value, r.attempts, r.series) == (m.state, m.attempts, m.series)

    @invariant()
    def open_runs_are_exactly_the_unfinished_ones(self) -> None:
        open_keys = {r.key for r in self.run(self.ledger.open_runs())}
        expected = {k for k, m in self.model.items() if m.state in ("pending", "running", "failed")}
        assert open_keys == expected


def test_ledger_run_state_machine(stores: Callable[[], Store]) -> None:
    LedgerMachine.stores = stores
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None),
    )
