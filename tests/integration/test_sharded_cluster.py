"""A cluster with several coordinator shards: one run per event across shards, merged
status and runs, pause/resume routed to the owning shard, a shard kill, offline reads."""

from __future__ import annotations

import concurrent.futures
from collections import Counter

import pytest
import ray

from actors.sharding import shard_of
from cluster.client import Client
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.ray

FLOWS = ("ingest", "other", "slow")


def test_three_shards_run_every_event_once_and_answer_as_one_cluster(make_cluster):
    c = make_cluster(
        [{"name": name, "clocks": [{"type": "webhook"}]} for name in FLOWS],
        coordinator_shards=3,
        workers=2,
    )
    d = c.cluster.deployment
    assert [h.name for h in d.coordinators] == ["coordinator-0", "coordinator-1", "coordinator-2"]
    owners = {shard_of("default", f, 3) for f in FLOWS}
    assert len(owners) >= 2, "the test needs its flows on more than one shard"

    bodies = [
        (flow, {"id": f"{flow}-{i}", "payload": {"sleep": 0.01}})
        for i in range(40)
        for flow in FLOWS
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda fb: c.post_retrying(*fb).status_code, bodies))
        # Kill the shard owning "ingest" while its duplicates arrive: Ray restarts it.
        owner = d.coordinators[shard_of("default", "ingest", 3)]
        ray.kill(owner.actor, no_restart=False)
        again = list(pool.map(lambda fb: c.post_retrying(*fb).status_code, bodies))
    assert Counter(first) == {202: len(bodies)}
    assert Counter(again) == {200: len(bodies)}

    for flow in FLOWS:
        wait_until(lambda flow=flow: c.completed(flow) == 40, timeout=90, what=f"{flow} done")
        assert c.executions(flow) == {f"{flow}-{i}": 1 for i in range(40)}
        s = c.status(flow)
        assert s["events"] == {"seen": 80, "accepted": 40, "duplicate": 40, "rejected": 0}
    assert len(c.runs()) == 120
    assert {r["state"] for r in c.runs()} == {"completed"}

    c.control("POST", "/v1/flows/default/other/pause")
    assert c.status("other")["state"] == "paused"
    assert c.post("other", {"id": "held", "payload": {}}).status_code == 202
    assert c.status("ingest")["state"] == "listening"
    c.control("POST", "/v1/flows/default/other/resume")
    wait_until(lambda: c.completed("other") == 41, what="held event runs on resume")

    c.cluster.stop(drain_timeout=5)
    offline = Client(c.cluster.config)
    flows = {f["flow"]: f for f in offline.status()["flows"]}
    assert flows["other"]["runs"]["completed"] == 41
    assert flows["slow"]["events"]["accepted"] == 40
    assert len(offline.runs()) == 121
