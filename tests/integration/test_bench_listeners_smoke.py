"""Bounded CI run of ``scripts/bench.py listeners``: it runs and prints valid JSON.

Speed and memory are never asserted; only that every tick of the window ran and the report has
its keys.
"""

from __future__ import annotations

import pytest

from tests.integration.test_bench_smoke import run_bench


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_listeners_bench_emits_valid_json() -> None:
    doc = run_bench(
        "listeners",
        "--counts=50",
        "--seconds=4",
        "--interval=2s",
        "--settle=0.5",
        "--grace=20",
        "--clocks-per-host=20",
        timeout=110,
    )
    assert doc["benchmark"] == "listeners"
    base = doc["baseline"]
    assert base["listeners"] == 0 and base["rss_total_mb"] > 0
    (row,) = doc["results"]
    keys = {
        "listeners",
        "hosts",
        "start_s",
        "rss_total_mb",
        "rss_per_listener_kb",
        "cpu_percent",
        "ticks_expected",
        "ticks_run",
        "tick_lateness",
        "runs_per_s",
    }
    assert keys <= row.keys()
    assert row["listeners"] == 50
    assert row["hosts"] == 3  # 50 clocks, 20 per host
    assert row["interval_clocks"] == 40
    # 40 interval clocks every 2 s over a window of a little over 4 s: 80 ticks and a few.
    assert 80 <= row["ticks_expected"] <= 90
    assert row["ticks_run"] == row["ticks_expected"]
    assert {"p50_ms", "p95_ms", "p99_ms"} <= row["tick_lateness"].keys()
    assert row["clock_states"] == {"listening": 50}
    assert doc["target_met"] is None  # no 10k row in a smoke run
