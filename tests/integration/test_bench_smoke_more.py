"""Bounded CI runs of the recovery, tracked and multi-rate latency benchmarks: each runs and
prints valid JSON with the expected keys. Speed is never asserted."""

from __future__ import annotations

import os
import socket

import pytest

from tests.integration.test_bench_smoke import run_bench


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def check_p50_max(part: dict) -> None:
    assert {"n", "p50", "max", "missing"} <= part.keys()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_recovery_bench_emits_valid_json() -> None:
    if not redis_up():
        if os.environ.get("CI"):
            pytest.fail("Redis is not answering on 127.0.0.1:6379")
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    doc = run_bench(
        "recovery",
        "--repeats=1",
        "--rate=20",
        "--warmup=1",
        "--baseline-seconds=1",
        "--gap=1",
        "--recover-timeout=30",
        timeout=120,
    )
    assert doc["benchmark"] == "recovery"
    assert [k["target"] for k in doc["kills"]] == ["coordinator", "host"]
    assert all(k["pid_changed"] for k in doc["kills"])
    coord, host = doc["summary"]["coordinator"], doc["summary"]["host"]
    for part in (*coord.values(), *host.values()):
        check_p50_max(part)
    assert coord["kill_to_first_202_s"]["n"] == 1
    assert host["kill_to_first_new_run_s_stream"]["n"] == 1
    for flow in ("hook", "stream"):
        assert {"p50_ms", "p99_ms", "n"} <= doc["baseline_event_to_flow_start"][flow].keys()
        # Exactly once through both kills (a guarantee, not a speed).
        integrity = doc["integrity"][flow]
        assert integrity["events"] > 0
        assert integrity["lost"] == 0 and integrity["duplicated"] == 0, integrity
    assert {"achieved_rate_per_s", "final_statuses"} <= doc["load"].keys()
    assert {"loadavg_before", "loadavg_after"} <= doc["machine"].keys()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tracked_bench_emits_valid_json() -> None:
    doc = run_bench(
        "tracked", "--runs=6", "--workers=1", "--no-named-bare", "--timeout=60", timeout=120
    )
    assert doc["benchmark"] == "tracked"
    ours, bare = doc["cluster"], doc["bare_prefect"]
    assert ours["completed"] == ours["with_prefect_flow_run_id"] == 6
    assert bare["completed"] == 6 and bare["processes"] == 1
    assert ours["runs_per_s"] > 0 and bare["runs_per_s"] > 0
    assert isinstance(doc["ratio_to_bare"], float)
    assert "bare_prefect_named_like_cluster" not in doc
    assert {"loadavg_before", "loadavg_after"} <= doc["machine"].keys()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_latency_bench_at_several_rates_emits_valid_json() -> None:
    doc = run_bench("latency", "--rates=20,200", "--seconds=1", "--modes=off", timeout=100)
    assert doc["benchmark"] == "latency"
    assert doc["rates_per_s"]["untracked"] == [20.0, 200.0]
    results = doc["results"]["untracked"]
    assert set(results) == {"20", "200"}
    for rate, r in results.items():
        assert r["events"] == int(rate) * 1
        assert r["event_to_flow_start"]["n"] == r["events"]
        assert {"p50_ms", "p95_ms", "p99_ms"} <= r["event_to_flow_start"].keys()
        assert {"achieved_rate_per_s", "max_behind_schedule_ms"} <= r.keys()
        assert r["final_statuses"] == {"202": r["events"]}
    assert "tracked" not in doc["results"]
    assert {"loadavg_before", "loadavg_after"} <= doc["machine"].keys()
