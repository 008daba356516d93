"""The walking skeleton end to end: real Ray, real HTTP, real S3 (moto), real files."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import boto3
import pytest
import ray

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.ray


def _s3(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_s3_object_becomes_exactly_one_run_with_object_details(make_cluster, moto_endpoint):
    bucket = f"landing-{uuid.uuid4().hex[:8]}"
    s3 = _s3(moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    c = make_cluster(
        [
            {
                "name": "ingest",
                "clocks": [
                    {
                        "type": "s3",
                        "bucket": bucket,
                        "prefix": "in/",
                        "endpoint_url": moto_endpoint,
                        "poll_interval": 0.2,
                    }
                ],
            }
        ]
    )
    put = s3.put_object(Bucket=bucket, Key="in/a.csv", Body=b"a,b\n1,2\n")
    wait_until(lambda: c.completed() == 1, what="one completed run")
    (row,) = c.log()
    payload = row["event"]["payload"]
    assert payload["bucket"] == bucket
    assert payload["key"] == "in/a.csv"
    assert payload["etag"] == put["ETag"].strip('"')
    assert payload["size"] == 8
    assert row["event"]["id"] == f"{bucket}/in/a.csv@{put['ETag'].strip(chr(34))}"
    assert row["event"]["tenant"] == "default" and row["event"]["flow"] == "ingest"


def test_same_s3_object_seen_again_after_cursor_loss_and_host_kill_still_runs_once(
    make_cluster, moto_endpoint
):
    bucket = f"landing-{uuid.uuid4().hex[:8]}"
    s3 = _s3(moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    c = make_cluster(
        [
            {
                "name": "ingest",
                "clocks": [
                    {
                        "type": "s3",
                        "bucket": bucket,
                        "endpoint_url": moto_endpoint,
                        "poll_interval": 0.2,
                    }
                ],
            }
        ]
    )
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"obj-{i}", Body=b"x")
    wait_until(lambda: c.completed() == 3, what="three runs")
    for cursor in (c.cluster.state_dir / "cursors").rglob("*.json"):
        cursor.unlink()
    ray.kill(c.cluster.deployment.hosts[0].actor, no_restart=False)
    # The restarted host lists the bucket from scratch: 3 more sightings, all duplicates.
    wait_until(lambda: c.status()["events"]["duplicate"] >= 3, timeout=60, what="re-sightings")
    s3.put_object(Bucket=bucket, Key="obj-new", Body=b"y")
    wait_until(lambda: c.completed() == 4, what="the new object's run")
    assert c.executions() == dict.fromkeys(c.executions(), 1)
    assert len(c.executions()) == 4


def test_webhook_posts_twice_give_202_then_200_and_exactly_one_run_each(make_cluster):
    c = make_cluster([{"name": "ingest", "clocks": [{"type": "webhook"}]}])
    for i in range(100):
        assert c.post("ingest", {"id": f"evt-{i}", "payload": {"i": i}}).status_code == 202
    for i in range(100):
        r = c.post("ingest", {"id": f"evt-{i}", "payload": {"i": i}})
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
    wait_until(lambda: c.completed() == 100, what="100 runs")
    assert len(c.executions()) == 100
    assert set(c.executions().values()) == {1}
    events = c.status()["events"]
    assert (events["seen"], events["accepted"], events["duplicate"]) == (200, 100, 100)
    # the hot hops took the fast lane: ingress → coordinator and coordinator → workers
    assert c.cluster.call("coordinator", "wire_stats")["served"] > 0
    workers = [h.name for h in c.cluster.deployment.workers]
    assert sum(c.cluster.call(w, "wire_stats")["served"] for w in workers) > 0


def test_bad_webhook_input_is_rejected_with_its_status_and_the_cluster_keeps_serving(make_cluster):
    c = make_cluster([{"name": "ingest", "clocks": [{"type": "webhook"}]}])
    assert c.post("ingest", b"{not json").status_code == 400
    assert c.post("ingest", b"[1, 2]").status_code == 400
    assert c.post("ingest", {"payload": "not an object"}).status_code == 400
    big = json.dumps({"payload": {"blob": "x" * (1024 * 1024 + 1)}}).encode()
    assert c.post("ingest", big).status_code == 413
    assert c.post("nope", {"payload": {}}).status_code == 404
    assert c.post("ingest", {"id": "good", "payload": {"ok": True}}).status_code == 202
    wait_until(lambda: c.completed() == 1, what="the good event's run")
    st = c.status()
    assert st["events"]["rejected"] == 4
    assert st["rejected_by_reason"] == {"malformed": 3, "too_large": 1}


def test_file_in_watched_directory_runs_once_and_bad_files_are_counted(make_cluster, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    c = make_cluster(
        [
            {
                "name": "ingest",
                "clocks": [{"type": "directory", "path": "./inbox", "pattern": "*.json"}],
            }
        ]
    )
    (inbox / "order-1.json").write_text('{"order": 1}')
    wait_until(lambda: c.completed() == 1, what="the file's run")
    (inbox / "broken.json").write_text('{"order": ')
    wait_until(lambda: c.status()["events"]["rejected"] == 1, what="the rejection")
    (inbox / "order-2.json").write_text('{"order": 2}')
    wait_until(lambda: c.completed() == 2, what="the second file's run")
    orders = sorted(r["event"]["payload"]["content"]["order"] for r in c.log())
    assert orders == [1, 2]
    st = c.status()
    assert st["rejected_by_reason"] == {"malformed": 1}
    assert [k["state"] for k in st["clocks"]] == ["listening"]
    first = next(r["event"] for r in c.log() if r["event"]["payload"]["name"] == "order-1.json")
    p = inbox / "order-1.json"
    assert first["id"] == f"{p}@{p.stat().st_size}@{p.stat().st_mtime_ns}"


def test_interval_ticks_and_webhook_events_run_the_same_flow(make_cluster):
    c = make_cluster(
        [{"name": "ingest", "clocks": [{"type": "interval", "every": "1s"}, {"type": "webhook"}]}]
    )
    assert c.post("ingest", {"id": "manual", "payload": {"x": 1}}).status_code == 202
    wait_until(
        lambda: len([r for r in c.log() if r["event"]["type"] == "tick"]) >= 2,
        timeout=30,
        what="two ticks",
    )
    ticks = [r["event"] for r in c.log() if r["event"]["type"] == "tick"]
    for tick in ticks:
        scheduled = tick["payload"]["scheduled"]
        assert tick["id"] == f"interval:{scheduled}"
        assert tick["occurred"] == scheduled
    assert "manual" in c.executions()


def test_pause_holds_runs_and_resume_runs_every_held_event_while_other_flows_keep_running(
    make_cluster,
):
    c = make_cluster(
        [
            {"name": "ingest", "clocks": [{"type": "webhook"}]},
            {"name": "other", "clocks": [{"type": "webhook"}]},
        ]
    )
    c.control("POST", "/v1/flows/default/ingest/pause")
    assert c.status()["state"] == "paused"
    for i in range(10):
        assert c.post("ingest", {"id": f"held-{i}", "payload": {}}).status_code == 202
        assert c.post("other", {"id": f"free-{i}", "payload": {}}).status_code == 202
    wait_until(lambda: c.completed("other") == 10, what="the other flow's runs")
    assert c.status()["runs"]["pending"] == 10
    assert c.log("ingest") == []
    c.control("POST", "/v1/flows/default/ingest/resume")
    wait_until(lambda: c.completed() == 10, what="the held runs")
    assert sorted(c.executions()) == sorted(f"held-{i}" for i in range(10))
    assert c.status()["state"] == "listening"


def test_coordinator_killed_mid_stream_loses_nothing_and_runs_nothing_twice(make_cluster):
    c = make_cluster([{"name": "ingest", "clocks": [{"type": "webhook"}]}])
    n = 150
    for i in range(n):
        if i == 50:
            ray.kill(c.cluster.deployment.coordinators[0].actor, no_restart=False)
        r = c.post_retrying("ingest", {"id": f"k-{i}", "payload": {"i": i}})
        assert r.status_code in (200, 202)
    wait_until(lambda: c.completed() == n, timeout=90, what=f"{n} runs")
    assert len(c.executions()) == n
    assert max(c.executions().values()) == 1
    # the restarted coordinator serves a new lane, and the ingress found it
    wait_until(
        lambda: (
            c.post("ingest", {"id": f"after-{uuid.uuid4()}", "payload": {}}).status_code == 202
            and c.cluster.call("coordinator", "wire_stats")["served"] > 0
        ),
        what="the ingress on the restarted coordinator's lane",
    )


def test_listener_host_killed_gets_its_clocks_back_and_loses_nothing(make_cluster, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    c = make_cluster(
        [
            {
                "name": "ingest",
                "clocks": [
                    {
                        "type": "directory",
                        "path": "./inbox",
                        "pattern": "*.json",
                        "poll_interval": 0.2,
                    }
                ],
            }
        ]
    )
    for i in range(20):
        (inbox / f"a-{i}.json").write_text(json.dumps({"i": i}))
    wait_until(lambda: c.completed() == 20, what="first 20 runs")
    ray.kill(c.cluster.deployment.hosts[0].actor, no_restart=True)
    # Files landing while the host is dead are picked up by its replacement.
    for i in range(20, 40):
        (inbox / f"a-{i}.json").write_text(json.dumps({"i": i}))
    wait_until(lambda: c.completed() == 40, timeout=90, what="40 runs after the host came back")
    assert len(c.executions()) == 40
    assert max(c.executions().values()) == 1
    assert [k["state"] for k in c.status()["clocks"]] == ["listening"]


def test_failing_flow_is_retried_then_dead_lettered_and_replay_runs_it_again(make_cluster):
    c = make_cluster(
        [{"name": "flaky", "retries": 1, "retry_delay": "50ms", "clocks": [{"type": "webhook"}]}]
    )
    assert c.post("flaky", {"id": "doomed", "payload": {"succeed_on": 3}}).status_code == 202
    wait_until(lambda: c.status("flaky")["runs"]["dead"] == 1, what="the dead letter")
    (dead,) = c.control("GET", "/v1/dlq")["dead"]
    assert dead["attempts"] == 2 and "flaky failure on attempt 2" in dead["error"]
    c.control("POST", "/v1/dlq/replay", json={"ids": ["doomed"]})
    # The replay is a new attempt series: attempts 1 and 2 fail again, then it is dead again.
    wait_until(lambda: len(c.log("flaky")) == 4, what="two more attempts")
    wait_until(lambda: c.status("flaky")["runs"]["dead"] == 1, what="dead again")
    assert [r["attempt"] for r in c.log("flaky")] == [1, 2, 1, 2]


def test_slow_runs_spread_over_workers_and_each_event_runs_once(make_cluster):
    c = make_cluster([{"name": "slow", "clocks": [{"type": "webhook"}]}], workers=2)
    for i in range(8):
        assert c.post("slow", {"id": f"s-{i}", "payload": {"sleep": 0.3}}).status_code == 202
    wait_until(lambda: c.completed("slow") == 8, what="8 slow runs")
    assert len({r["pid"] for r in c.log("slow")}) == 2
    assert len(c.executions("slow")) == 8


def test_status_and_runs_survive_the_cluster_stopping(make_cluster, tmp_path: Path):
    from cluster.client import Client
    from cluster.config import load_config

    c = make_cluster([{"name": "ingest", "clocks": [{"type": "webhook"}]}])
    for i in range(3):
        c.post("ingest", {"id": f"r-{i}", "payload": {}})
    wait_until(lambda: c.completed() == 3, what="3 runs")
    c.cluster.stop(drain_timeout=5)
    time.sleep(0.1)
    offline = Client(load_config(tmp_path / "listeners.yaml"))
    assert not offline.live
    flow = offline.status()["flows"][0]
    assert flow["runs"]["completed"] == 3 and flow["events"]["accepted"] == 3
    assert sorted(r["event_id"] for r in offline.runs()) == ["r-0", "r-1", "r-2"]


def test_batch_delivery_gives_one_run_a_list_of_events_and_each_event_runs_once(make_cluster):
    c = make_cluster(
        [
            {
                "name": "ingest",
                "delivery": {"mode": "batch", "max_events": 5, "max_wait": "300ms"},
                "clocks": [{"type": "webhook"}],
            }
        ]
    )
    for i in range(12):
        assert c.post("ingest", {"id": f"b-{i}", "payload": {"i": i}}).status_code == 202
    wait_until(lambda: c.completed() == 12, what="12 member runs")
    batches = [r["event"] for r in c.log()]
    assert all(b["type"] == "batch" for b in batches)
    members = [m["id"] for b in batches for m in b["payload"]["events"]]
    assert sorted(members) == sorted(f"b-{i}" for i in range(12))
    assert max(len(b["payload"]["events"]) for b in batches) <= 5


def test_coordinator_killed_for_good_is_recreated_and_ingress_and_hosts_follow_it(
    make_cluster, tmp_path
):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    c = make_cluster(
        [
            {"name": "ingest", "clocks": [{"type": "webhook"}]},
            {"name": "other", "clocks": [{"type": "directory", "path": str(inbox)}]},
        ]
    )
    assert c.post("ingest", {"id": "before", "payload": {}}).status_code == 202
    ray.kill(c.cluster.deployment.coordinators[0].actor, no_restart=True)
    # Ray will not restart it; the supervisor creates a new actor under the same name, and
    # the ingress's and the host's handles look the name up again.
    r = c.post_retrying("ingest", {"id": "after", "payload": {}}, timeout=90)
    assert r.status_code == 202
    (inbox / "late.json").write_text("{}")
    wait_until(lambda: c.completed("ingest") == 2, timeout=60, what="both webhook events")
    wait_until(lambda: c.completed("other") == 1, timeout=60, what="the file after the kill")
    assert c.executions("ingest") == {"before": 1, "after": 1}
