"""latency: event → flow-start for events POSTed to the ingress (as ``listeners emit`` does) at a
steady rate. "sent" is taken by the client right before the POST; "start" is the first line
of the flow body. Also reports the ingress→start part measured inside the cluster, and, as the
same-run baseline, the bare HTTP round trip to the ingress's health endpoint.

    python scripts/bench.py latency [--rate 100] [--seconds 10] [--modes off,embedded]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import send_steady, start_cluster, summary_ms, wait_lines

NAME = "latency"
HELP = "event → flow-start latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="off,embedded")
    parser.add_argument(
        "--tracked-rate",
        type=float,
        default=5.0,
        help="rate for tracked runs (a SQLite Prefect server sustains ~10 tracked runs/s)",
    )


def latency_mode(prefect: str, rate: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        cluster = start_cluster(root, prefect)
        try:
            url = f"{cluster.ingress_url}/v1/events/bench/probe"
            n = int(rate * seconds)
            with httpx.Client(timeout=30) as client:
                send_steady(client, url, rate=20, n=20, tag="warm")
                wait_lines(root / "probe.jsonl", 20, 120)
                (root / "probe.jsonl").unlink()
                cluster.call("coordinator", "latencies", True)
                health = []
                for _ in range(200):
                    t = time.perf_counter()
                    client.get(f"{cluster.ingress_url}/v1/health")
                    health.append(time.perf_counter() - t)
                send_steady(client, url, rate=rate, n=n, tag="m")
            rows = wait_lines(root / "probe.jsonl", n, 300)
            inside = cluster.call("coordinator", "latencies", True)
        finally:
            cluster.stop(drain_timeout=10)
    return {
        "events": n,
        "event_to_flow_start": summary_ms([r["started"] - r["sent"] for r in rows]),
        "ingress_to_flow_start": summary_ms(inside),
        "baseline_http_roundtrip": summary_ms(health),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for mode in args.modes.split(","):
        rate = args.rate if mode == "off" else args.tracked_rate
        results["untracked" if mode == "off" else "tracked"] = latency_mode(
            mode, rate, args.seconds
        )
        results["untracked" if mode == "off" else "tracked"]["rate_per_s"] = rate
    for r in results.values():
        base = r["baseline_http_roundtrip"]["p50_ms"]
        r["p50_ratio_to_http_roundtrip"] = round(r["event_to_flow_start"]["p50_ms"] / base, 1)
    return {
        "benchmark": "latency",
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "results": results,
        "target": {"untracked_p50_ms": 8, "untracked_p99_ms": 25, "at_rate_per_s": 100},
    }
