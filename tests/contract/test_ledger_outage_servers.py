"""A coordinator over a PostgreSQL or Redis ledger rides out the server going away mid-run:
the connection is cut (a TCP proxy between them), runs finish meanwhile, the server comes back,
and every event has run exactly once, without restarting the coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import ledger_outage
from actors.coordinator import Coordinator, FlowPolicy, TenantPolicy
from actors.ledger import open_ledger
from actors.worker import FlowTarget, FlowWorker
from tests.contract.ledgers import (
    PG_DATABASE,
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    drop_store,
    fresh_namespace,
    require_postgres,
    require_redis,
)
from tests.contract.proxy import TcpProxy
from tests.unit import flows_unit
from tests.unit.helpers import all_in_state, make_event, no_jitter, wait_for

pytestmark = pytest.mark.service


@pytest.fixture(autouse=True)
def _quick_recovery(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(ledger_outage, "OUTAGE_RETRY_MAX", 0.5)
    flows_unit.reset()
    yield
    flows_unit.reset()


@pytest.fixture(params=["postgresql", "redis"])
def proxied_ledger_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, TcpProxy]]:
    backend = request.param
    if backend == "postgresql":
        require_postgres()
        proxy = TcpProxy(PG_HOST, PG_PORT)
        base = f"postgresql://postgres@127.0.0.1:{proxy.port}/{PG_DATABASE}"
    else:
        require_redis()
        proxy = TcpProxy(REDIS_HOST, REDIS_PORT)
        base = f"redis://127.0.0.1:{proxy.port}/0"
    namespace = fresh_namespace()
    try:
        yield f"{base}?namespace={namespace}", proxy
    finally:
        proxy.close()
        asyncio.run(drop_store(backend, namespace))


async def test_runs_in_flight_and_queued_survive_the_ledger_server_going_away(
    proxied_ledger_url: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    url, proxy = proxied_ledger_url
    flows_unit.GATE = gate = asyncio.Event()
    worker = FlowWorker(0, [FlowTarget("acme", "ingest", flow_obj=flows_unit.gated_flow)])
    coord = Coordinator(
        open_ledger(url, tmp_path),
        [worker],
        [FlowPolicy("acme", "ingest", retries=3, retry_delay=0.01)],
        [TenantPolicy("acme")],
        worker_concurrency=4,
        rng=no_jitter,
    )
    await coord.start()
    try:
        assert await coord.submit([make_event(f"e{i}") for i in range(12)]) == ["accepted"] * 12
        await wait_for(lambda: len(flows_unit.CALLS) == 4, timeout=30)  # 4 running, 8 queued
        proxy.cut()
        gate.set()  # the 4 runs end while their outcomes cannot be written

        async def outage() -> bool:
            return not coord.ledger_ok

        await wait_for(outage, timeout=30)
        await asyncio.sleep(0.5)  # reconciles fail meanwhile
        assert len(flows_unit.CALLS) == 4  # nothing new starts without the ledger
        proxy.restore()
        await wait_for(all_in_state(coord, 12, "completed"), timeout=60)
        runs = await coord.runs()
    finally:
        await coord.stop(drain_timeout=2.0)
        await coord.ledger.close()
    assert dict(flows_unit.CALLS) == {f"e{i}": [1] for i in range(12)}
    assert {r["attempts"] for r in runs} == {1}
    assert coord.ledger_outages == 1
