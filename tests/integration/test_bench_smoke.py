"""Bounded CI runs of the benchmarks: each runs and prints valid JSON. Speed is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*argv: str, timeout: float) -> dict[str, Any]:
    """``python scripts/bench.py <argv>``; on timeout SIGTERM it (it cleans up) and fail."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench {argv} ran over {timeout:.0f}s; stderr tail:\n{err[-3000:]}")
    assert proc.returncode == 0, f"bench {argv} exited {proc.returncode}:\n{err[-3000:]}"
    return json.loads(out)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_peer_prefect_bench_emits_valid_json() -> None:
    doc = run_bench(
        "peer-prefect",
        "--prefect-events=2",
        "--prefect-interval=0.5",
        "--prefect-timeout=45",
        "--ours-events=20",
        "--ours-rate=50",
        "--tracked-events=0",
        timeout=120,
    )
    assert doc["benchmark"] == "peer-prefect"
    peer, ours = doc["prefect"], doc["ours"]["untracked"]
    assert peer["events"] == 2
    assert peer["runs_started"] + peer["missing"] == 2
    assert peer["runs_started"] >= 1  # the trigger path fired at least once
    assert peer["automations"] == 1
    assert ours["events"] == ours["runs_started"] == 20
    for part in (peer["event_to_flow_start"], ours["event_to_flow_start"]):
        assert {"n", "p50_ms", "p95_ms", "p99_ms"} <= part.keys()
    assert isinstance(doc["ratio_p50"], float)
    assert "tracked" not in doc["ours"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sources_bench_emits_valid_json() -> None:
    kinds = ["directory", "webhook", "redis-stream"]
    doc = run_bench(
        "sources",
        "--latency-events=3",
        "--throughput-events=50",
        "--timeout=60",
        f"--only={','.join(kinds)}",
        timeout=200,
    )
    assert doc["benchmark"] == "sources"
    assert set(doc["results"]) == set(kinds)
    for kind, result in doc["results"].items():
        if "skipped" in result:  # its service is down on this machine
            assert isinstance(result["skipped"], str), kind
            continue
        assert "error" not in result, (kind, result)
        assert {"p50_ms", "p99_ms", "n"} <= result["latency"].keys(), kind
        assert result["latency"]["n"] == 3, kind
        assert {"events", "seconds", "events_per_second"} <= result["throughput"].keys(), kind
        assert result["throughput"]["events"] == 50, kind
    assert {"loadavg_before", "loadavg_after"} <= doc["machine"].keys()
