"""A real cluster on ``ledger: postgresql://...`` and on ``ledger: redis://...``: webhook events
run once each, duplicates are answered 200, a coordinator restart loses nothing, and the ledger
(in the state dir's own schema or key prefix) is found again by ``status`` while the cluster is
down and by the next ``up``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from actors.errors import LedgerError
from actors.ledger import open_ledger
from actors.ledger.target import default_namespace
from cluster.client import Client
from cluster.config import load_config
from tests.contract.ledgers import (
    PG_URL,
    REDIS_URL,
    drop_keys,
    drop_schemas,
    require_postgres,
    require_redis,
)
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.service]
WEBHOOK = [{"name": "ingest", "clocks": [{"type": "webhook"}]}]


@pytest.fixture(params=["postgresql", "redis"])
def server_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The ledger URL; the cluster's data (named after its state dir) is dropped after the
    test. Ask for it before ``make_cluster``, so the cluster stops before the drop."""
    namespace = default_namespace(tmp_path / ".listeners")
    if request.param == "postgresql":
        require_postgres()
        yield PG_URL
        asyncio.run(drop_schemas(namespace))
    else:
        require_redis()
        yield REDIS_URL
        asyncio.run(drop_keys(namespace))


async def runs_in_ledger(url: str, state_dir: Path) -> dict[str, int]:
    """Run states as the ledger on the server holds them (read directly, not through the
    cluster)."""
    ledger = open_ledger(url, state_dir)
    try:
        return {k: v for k, v in (await ledger.counts())[("default", "ingest")].runs.items() if v}
    finally:
        await ledger.close()


def test_webhook_events_on_a_server_ledger_run_once_across_a_coordinator_restart(
    server_ledger, make_cluster, tmp_path
):
    c = make_cluster(WEBHOOK, ledger=server_ledger)
    for i in range(40):
        assert c.post("ingest", {"id": f"k-{i}", "payload": {"i": i}}).status_code == 202
    for i in range(40):
        r = c.post("ingest", {"id": f"k-{i}", "payload": {"i": i}})
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
    for i in range(40, 100):
        if i == 60:
            ray.kill(c.cluster.deployment.coordinators[0].actor, no_restart=False)
        assert c.post_retrying("ingest", {"id": f"k-{i}", "payload": {"i": i}}).status_code in (
            200,
            202,
        )
    wait_until(lambda: c.completed() == 100, timeout=90, what="100 runs")
    assert c.executions() == {f"k-{i}": 1 for i in range(100)}
    events = c.status()["events"]
    assert events["accepted"] == 100
    assert events["duplicate"] >= 40
    assert events["seen"] == events["accepted"] + events["duplicate"]
    assert asyncio.run(runs_in_ledger(server_ledger, c.cluster.state_dir)) == {"completed": 100}
    assert not (c.cluster.state_dir / "ledger.db").exists()


def test_the_same_state_dir_finds_its_server_ledger_down_and_after_a_restart(
    server_ledger, make_cluster, tmp_path
):
    c = make_cluster(WEBHOOK, ledger=server_ledger)
    for i in range(5):
        assert c.post("ingest", {"id": f"e-{i}", "payload": {}}).status_code == 202
    wait_until(lambda: c.completed() == 5, timeout=60, what="5 runs")
    c.cluster.stop(drain_timeout=5)

    # down: status and runs read the ledger on the server
    offline = Client(load_config(tmp_path / "listeners.yaml"))
    assert not offline.live
    (flow,) = offline.status()["flows"]
    assert (flow["events"]["accepted"], flow["runs"]["completed"]) == (5, 5)
    assert sorted(r["event_id"] for r in offline.runs()) == [f"e-{i}" for i in range(5)]

    # a changed shard count is refused before anything starts
    with pytest.raises(LedgerError, match="coordinator_shards=1"):
        make_cluster(WEBHOOK, ledger=server_ledger, coordinator_shards=2)

    again = make_cluster(WEBHOOK, ledger=server_ledger)
    assert again.post("ingest", {"id": "e-0", "payload": {}}).status_code == 200
    assert again.post("ingest", {"id": "e-new", "payload": {}}).status_code == 202
    wait_until(lambda: again.completed() == 6, timeout=60, what="the new event's run")
    assert again.executions() == {**{f"e-{i}": 1 for i in range(5)}, "e-new": 1}
