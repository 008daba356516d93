"""A cluster with ``prefect: embedded``: runs are tracked in the cluster's own Prefect server."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.ray


def test_embedded_prefect_tracks_each_run_with_event_tags_and_run_name(make_cluster):
    c = make_cluster(
        [{"name": "ingest", "clocks": [{"type": "webhook"}]}],
        prefect="embedded",
        tracked_concurrency=3,
    )
    assert c.cluster.call("worker-0", "ping")["tracked_concurrency"] == 3  # from the config
    assert c.post("ingest", {"id": "order-42", "payload": {"n": 42}}).status_code == 202
    wait_until(lambda: c.completed() == 1, timeout=60, what="the tracked run")
    (run,) = c.runs()
    assert run["prefect_flow_run_id"]
    api_url = c.cluster.prefect_api_url

    async def read():  # type: ignore[no-untyped-def]
        async with PrefectClient(api_url) as client:
            return await client.read_flow_run(UUID(run["prefect_flow_run_id"]))

    flow_run = asyncio.run(read())
    assert flow_run.state.type == StateType.COMPLETED
    assert {"tenant:default", "flow:ingest", "event:order-42"} <= set(flow_run.tags)
    assert "order-42" in flow_run.name
    (row,) = c.log()
    assert row["event"]["payload"] == {"n": 42}
