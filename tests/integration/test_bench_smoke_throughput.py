"""Bounded CI run of the throughput benchmark: it runs and prints valid JSON with exact counts
(every generated event claimed once, the re-sent ids counted as duplicates). No speed checks."""

from __future__ import annotations

import pytest

from tests.integration.test_bench_smoke import run_bench


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_throughput_bench_emits_valid_json_with_exact_counts() -> None:
    doc = run_bench(
        "throughput",
        "--events=4000",
        "--shards=2",
        "--flows=4",
        "--batch=200",
        "--dispatch-seconds=1",
        "--profile",
        timeout=150,
    )
    assert doc["benchmark"] == "throughput"
    assert doc["baseline_bare_sqlite_claim_events_per_s"] > 0
    (r,) = doc["results"]
    assert r["shards"] == 2
    assert r["accepted"] == r["expected_new"] == 4000
    assert r["duplicate"] == r["events_sent"] - 4000 > 0
    assert r["ingest_events_per_s"] > 0 and r["dispatched_runs_per_s"] >= 0
    assert {"coordinator-0", "coordinator-1", "producer-0", "producer-1"} == set(r["profile"])
    for part in r["profile"].values():
        assert {"samples", "self", "inclusive_ours"} <= part.keys()
