"""Coordinator shards: stable placement, exact counts, no event claimed by two shards."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from helpers import RecordingWorker, make_event, running, wait_for

from actors import sharding
from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.errors import LedgerError
from actors.ledger import SQLiteLedger, check_shard_layout, shard_ledger_url, shard_paths
from actors.sharding import CoordinatorShards, shard_of, split_share

FLOWS = [FlowPolicy("acme", f"f{i}") for i in range(8)] + [
    FlowPolicy("beta", f"f{i}") for i in range(4)
]


def test_shard_of_is_stable_and_in_range() -> None:
    # Pinned: a change of the hash would move flows away from the ledgers holding their ids.
    assert [shard_of("acme", f"f{i}", 4) for i in range(6)] == [
        zlib.crc32(f"acme\x00f{i}".encode()) % 4 for i in range(6)
    ]
    assert shard_of("acme", "ingest", 1) == 0
    assert {shard_of("t", f"f{i}", 3) for i in range(100)} == {0, 1, 2}
    assert shard_of("acme", "f1", 4) == zlib.crc32(b"acme\x00f1") % 4


def test_tenant_limits_are_split_in_proportion_to_flows() -> None:
    assert split_share(8, 1, 2) == 4
    assert split_share(8, 2, 2) == 8
    assert split_share(8, 1, 100) == 1
    assert split_share(1000, 3, 4) == 750


def make_shards(tmp_path: Path, n: int, worker: RecordingWorker) -> list[Coordinator]:
    shards = []
    for i in range(n):
        mine = [f for f in FLOWS if shard_of(f.tenant, f.flow, n) == i]
        url = shard_ledger_url(f"sqlite:///{tmp_path / 'ledger.db'}", i, n)
        shards.append(
            Coordinator(
                SQLiteLedger(url.removeprefix("sqlite:///")),
                [worker],
                mine,
                [TenantPolicy("acme", 64, 100_000), TenantPolicy("beta", 64, 100_000)],
            )
        )
    return shards


async def test_sharded_submit_claims_each_event_once_in_its_own_shard(tmp_path: Path) -> None:
    worker = RecordingWorker()
    shards = make_shards(tmp_path, 3, worker)
    router = CoordinatorShards(shards)
    events = [make_event(f"e{i}", tenant=f.tenant, flow=f.flow) for f in FLOWS for i in range(25)]
    for s in shards:
        await s.start()
    try:
        outcomes = await router.submit(events)
        assert outcomes == ["accepted"] * len(events)
        again = await router.submit([*reversed(events), make_event("zz", flow="nope")])
        assert again == ["duplicate"] * len(events) + ["rejected:unknown_flow"]

        async def done() -> bool:
            return sum(1 for r in await router.runs(limit=10_000) if r["state"] == "completed") == (
                len(events)
            )

        await wait_for(done, timeout=20)
        # Each flow's rows live in exactly one shard's ledger: the one shard_of names.
        for i, s in enumerate(shards):
            for r in await s.runs(limit=10_000):
                assert shard_of(r["tenant"], r["flow"], 3) == i
        keys = [(e["tenant"], e["flow"], e["id"]) for e in worker.events]
        assert len(keys) == len(set(keys)) == len(events)
        status = await router.status()
        assert len(status["flows"]) == len(FLOWS)
        assert sum(f["events"]["accepted"] for f in status["flows"]) == len(events)
        assert sum(f["events"]["duplicate"] for f in status["flows"]) == len(events)
        assert status["ledger"] == {"ok": True, "outages": 0}
        await router.pause("beta", "f2")
        paused = [f for f in (await router.status())["flows"] if f["paused"]]
        assert [(f["tenant"], f["flow"]) for f in paused] == [("beta", "f2")]
        one = await router.runs("acme", "f3", None, 1000)
        assert {r["flow"] for r in one} == {"f3"} and len(one) == 25
        assert len(await router.runs(limit=7)) == 7
    finally:
        for s in shards:
            await s.stop(drain_timeout=2)
            await s.ledger.close()


async def test_per_key_order_is_kept_within_a_flow_across_the_router(tmp_path: Path) -> None:
    worker = RecordingWorker()
    shards = make_shards(tmp_path, 2, worker)
    for s in shards:
        s.worker_concurrency = 1  # one run at a time: start order = queue order
    router = CoordinatorShards(shards)
    for s in shards:
        await s.start()
    try:
        for chunk in range(4):
            await router.submit(
                [make_event(f"{chunk}-{i}", flow="f5") for i in range(5)]
                + [make_event(f"{chunk}-{i}", flow="f6") for i in range(5)]
            )

        async def done() -> bool:
            return len(worker.calls) == 40

        await wait_for(done, timeout=20)
    finally:
        for s in shards:
            await s.stop(drain_timeout=2)
            await s.ledger.close()
    for flow in ("f5", "f6"):
        seen = [e["id"] for e in worker.events if e["flow"] == flow]
        assert seen == [f"{c}-{i}" for c in range(4) for i in range(5)]


async def test_one_shard_router_is_a_pass_through(tmp_path: Path) -> None:
    worker = RecordingWorker()
    (shard,) = make_shards(tmp_path, 1, worker)
    async with running(shard):
        router = CoordinatorShards([shard])
        assert await router.submit([make_event("a", flow="f0")]) == ["accepted"]
        assert await router.call("latencies") == await shard.latencies()
        assert (await router.call("ping"))["name"] == "coordinator"  # not merged: the shard's
    assert (tmp_path / "ledger.db").exists()


def test_shard_ledger_files_and_layout_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert shard_ledger_url(url, 0, 1) == url
    paths = shard_paths(url, tmp_path, 3)
    assert [p.name for p in paths] == [f"ledger.shard{i}of3.db" for i in range(3)]
    check_shard_layout(url, tmp_path, 3)  # nothing written yet: any layout is fine
    paths[0].write_bytes(b"")
    check_shard_layout(url, tmp_path, 3)
    with pytest.raises(LedgerError, match=r"coordinator_shards=3.*asks for 1"):
        check_shard_layout(url, tmp_path, 1)
    (tmp_path / "ledger.db").write_bytes(b"")
    with pytest.raises(LedgerError, match="coordinator_shards=1"):
        check_shard_layout(url, tmp_path, 3)


class _Shard:
    def __init__(self, ledger: dict[str, object]) -> None:
        self.ledger = ledger

    async def status(self) -> dict[str, object]:
        return {"flows": [], "ledger": self.ledger}


async def test_status_of_shards_names_each_shard_whose_ledger_cannot_be_read() -> None:
    router = CoordinatorShards(
        [
            _Shard({"ok": True, "outages": 1}),
            _Shard({"ok": False, "outages": 2, "error": "LedgerError: refused"}),
            _Shard({"ok": False, "outages": 1}),
        ]
    )
    status = await router.status()
    assert status["ledger"] == {"ok": False, "outages": 4, "error": "shard 1: LedgerError: refused"}


def test_the_router_remembers_owners_up_to_a_bound_and_they_match_shard_of(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sharding, "MAX_REMEMBERED", 5)
    router = CoordinatorShards(["s0", "s1", "s2"])
    for i in range(12):
        assert router.shard("acme", f"f{i}") == f"s{shard_of('acme', f'f{i}', 3)}"
        assert len(router._owners) <= 5
    assert router.shard("acme", "f11") == f"s{shard_of('acme', 'f11', 3)}"  # remembered
