"""The coordinator rides out a ledger that stops answering: nothing is lost, nothing runs twice,
and dispatch resumes by itself once the ledger answers again (no restart)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import flows_unit
import pytest
from flows_unit import CALLS
from helpers import all_in_state, make_event, no_jitter, running, wait_for

from actors import ledger_outage
from actors.batching import BatchPolicy
from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.ledger import SQLiteLedger
from actors.worker import FlowTarget, FlowWorker

# The ledger calls of the dispatch path (claims keep working: the source side retries its own).
DISPATCH_CALLS = ("start_many", "start_batch", "finish", "pending", "open_runs", "counts")


class LedgerDown(ConnectionError):
    pass


class FlakyLedger:
    """A SQLite ledger whose dispatch-path calls fail while ``down``; a call named in
    ``commit_then_fail`` does its work, then fails once (an answer lost after COMMIT)."""

    def __init__(self, path: Path) -> None:
        self.inner = SQLiteLedger(path)
        self.down = False
        self.commit_then_fail: set[str] = set()
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)
        if name not in DISPATCH_CALLS:
            return real

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.failures += 1
                raise LedgerDown(f"{name}: connection refused")
            result = await real(*args, **kwargs)
            if name in self.commit_then_fail:
                self.commit_then_fail.discard(name)
                self.failures += 1
                raise LedgerDown(f"{name}: connection lost after COMMIT")
            return result

        return call


@pytest.fixture(autouse=True)
def _fast_recovery(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(ledger_outage, "OUTAGE_RETRY_MIN", 0.01)
    monkeypatch.setattr(ledger_outage, "OUTAGE_RETRY_MAX", 0.05)
    flows_unit.reset()
    yield
    flows_unit.reset()


def coordinator(
    ledger: FlakyLedger, flow: Any, *, retries: int = 3, queue_window: int = 2_000, **policy: Any
) -> Coordinator:
    worker = FlowWorker(0, [FlowTarget("acme", "ingest", flow_obj=flow)], tracking="off")
    return Coordinator(
        ledger,  # type: ignore[arg-type]
        [worker],
        [FlowPolicy("acme", "ingest", retries=retries, retry_delay=0.01, **policy)],
        [TenantPolicy("acme")],
        rng=no_jitter,
        queue_window=queue_window,
    )


def went_down(ledger: FlakyLedger) -> Callable[[], Awaitable[bool]]:
    async def cond() -> bool:
        return ledger.failures > 0

    return cond


async def test_runs_whose_start_failed_run_once_the_ledger_answers_again(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    async with running(coordinator(ledger, flows_unit.record_flow)) as coord:
        ledger.down = True
        assert await coord.submit([make_event(f"e{i}") for i in range(5)]) == ["accepted"] * 5
        await wait_for(went_down(ledger))
        assert not (await coord.ping())["ledger_ok"]
        assert CALLS == {}  # nothing runs without its start in the ledger
        ledger.down = False
        await wait_for(all_in_state(coord, 5, "completed"))
        status = await coord.ping()
    assert dict(CALLS) == {f"e{i}": [1] for i in range(5)}
    assert (status["ledger_ok"], status["ledger_outages"]) == (True, 1)


async def test_an_outcome_the_ledger_could_not_take_is_recorded_once_it_answers(
    tmp_path: Path,
) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    flows_unit.GATE = gate = asyncio.Event()
    async with running(coordinator(ledger, flows_unit.gated_flow)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "running"))
        ledger.down = True
        gate.set()  # the run ends while its outcome cannot be written
        await wait_for(went_down(ledger))
        assert (await coord.ping())["inflight"] == 1  # the outcome waits in memory
        ledger.down = False
        await wait_for(all_in_state(coord, 1, "completed"))
        run = (await coord.runs())[0]
    assert dict(CALLS) == {"e1": [1]}
    assert run["attempts"] == 1


async def test_a_start_that_committed_although_its_call_failed_runs_once(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    ledger.commit_then_fail.add("start_many")
    async with running(coordinator(ledger, flows_unit.record_flow)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "completed"))
        run = (await coord.runs())[0]
    assert ledger.failures == 1
    assert dict(CALLS) == {"e1": [1]}  # restored from the ledger as running, attempt 1
    assert run["attempts"] == 1


async def test_a_failed_attempt_recorded_although_its_call_failed_still_retries(
    tmp_path: Path,
) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    ledger.commit_then_fail.add("finish")  # the first outcome: attempt 1 failed
    async with running(coordinator(ledger, flows_unit.flaky_flow)) as coord:
        await coord.submit([make_event("e1", payload={"succeed_on": 2})])
        await wait_for(all_in_state(coord, 1, "completed"))
        run = (await coord.runs())[0]
    assert ledger.failures == 1
    assert dict(CALLS) == {"e1": [1, 2]}
    assert run["attempts"] == 2


async def test_batch_members_whose_start_failed_run_once_in_a_batch(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    batch = BatchPolicy(max_events=3, max_wait=0.05)
    async with running(coordinator(ledger, flows_unit.record_flow, batch=batch)) as coord:
        ledger.down = True
        await coord.submit([make_event(f"e{i}") for i in range(3)])
        await wait_for(went_down(ledger))
        ledger.down = False
        await wait_for(all_in_state(coord, 3, "completed"))
        runs = await coord.runs()
    assert len(CALLS) == 1 and len(next(iter(CALLS.values()))) == 1  # one batch run, once
    assert sorted(r["event_id"] for r in runs) == ["e0", "e1", "e2"]
    assert {r["attempts"] for r in runs} == {1}


async def test_a_backlog_whose_paging_failed_is_paged_again(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    async with running(coordinator(ledger, flows_unit.record_flow, queue_window=4)) as coord:
        await coord.pause("acme", "ingest")
        await coord.submit([make_event(f"e{i}") for i in range(20)])  # 16 wait in the ledger
        ledger.down = True
        await coord.resume("acme", "ingest")
        await wait_for(went_down(ledger))
        ledger.down = False
        await wait_for(all_in_state(coord, 20, "completed"))
    assert dict(CALLS) == {f"e{i}": [1] for i in range(20)}


async def test_status_in_an_outage_shows_the_last_counts_read_and_why(tmp_path: Path) -> None:
    ledger = FlakyLedger(tmp_path / "ledger.db")
    async with running(coordinator(ledger, flows_unit.record_flow)) as coord:
        await coord.submit([make_event("e1")])
        await wait_for(all_in_state(coord, 1, "completed"))
        before = await coord.status()
        ledger.down = True
        during = await coord.status()
        ledger.down = False
        after = await coord.status()
    assert before["ledger"] == {"ok": True, "outages": 0}
    assert during["flows"] == before["flows"]
    assert during["ledger"]["ok"] is False
    assert during["ledger"]["error"] == "LedgerDown: counts: connection refused"
    assert after["ledger"] == {"ok": True, "outages": 0}  # a failed read is not an outage
