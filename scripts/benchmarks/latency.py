"""latency: event → flow-start for events POSTed to the ingress (as ``listeners emit`` does) at
steady rates, one measurement per rate on the same cluster. An open-loop client fires each POST
on schedule with many in flight (a sequential client cannot keep 1,000/s); the achieved rate
and the worst lateness against the schedule are reported with each rate. "sent" is taken by
the client when the POST is due; "start" is the first line of the flow body. Also reports the
ingress→start part measured inside the cluster, and, as the same-run baseline, the bare HTTP
round trip to the ingress's health endpoint.

    python scripts/bench.py latency [--rates 10,100,1000] [--tracked-rates 5] [--seconds 10]
        [--modes off,embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._load import fire
from benchmarks.common import send_steady, start_cluster, summary_ms, wait_lines

NAME = "latency"
HELP = "event → flow-start latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rates", default="10,100,1000", help="untracked events/s, one measurement each"
    )
    parser.add_argument("--rate", type=float, default=None, help="one rate (overrides --rates)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate")
    parser.add_argument("--modes", default="off,embedded")
    parser.add_argument(
        "--tracked-rates",
        default="5",
        help="events/s for tracked runs (a SQLite Prefect server sustains ~10 tracked runs/s)",
    )
    parser.add_argument("--tracked-rate", type=float, default=None, help="one tracked rate")
    parser.add_argument(
        "--max-in-flight", type=int, default=64, help="client: most requests on the wire at once"
    )


def _rates(single: float | None, many: str) -> list[float]:
    if single is not None:
        return [single]
    return [float(r) for r in many.split(",") if r.strip()]


def _key(rate: float) -> str:
    return str(int(rate)) if rate == int(rate) else str(rate)


def latency_mode(
    prefect: str, rates: list[float], seconds: float, in_flight: int = 64
) -> dict[str, Any]:
    """One cluster; the HTTP baseline, then each rate in turn (the log is emptied between)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        log = root / "probe.jsonl"
        cluster = start_cluster(root, prefect)
        try:
            url = f"{cluster.ingress_url}/v1/events/bench/probe"
            with httpx.Client(timeout=30) as client:
                send_steady(client, url, rate=20, n=20, tag="warm")
                wait_lines(log, 20, 120)
                health = []
                for _ in range(200):
                    t = time.perf_counter()
                    client.get(f"{cluster.ingress_url}/v1/health")
                    health.append(time.perf_counter() - t)
            baseline = summary_ms(health)
            for rate in rates:
                log.unlink(missing_ok=True)
                cluster.call("coordinator", "latencies", True)
                n = max(1, int(rate * seconds))
                tag = f"m{_key(rate)}"
                load = asyncio.run(
                    fire(url, rate, n=n, tag=tag, give_up_after=30, max_connections=in_flight)
                )
                rows = wait_lines(log, n, 300)
                inside = cluster.call("coordinator", "latencies", True)
                result = {
                    "events": n,
                    **load.summary(rate),
                    "event_to_flow_start": summary_ms([r["started"] - r["sent"] for r in rows]),
                    "ingress_to_flow_start": summary_ms(inside),
                    "baseline_http_roundtrip": baseline,
                }
                base = baseline["p50_ms"]
                p50 = result["event_to_flow_start"]["p50_ms"]
                result["p50_ratio_to_http_roundtrip"] = round(p50 / base, 1)
                out[_key(rate)] = result
        finally:
            cluster.stop(drain_timeout=10)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rates = _rates(args.rate, args.rates)
    tracked_rates = _rates(args.tracked_rate, args.tracked_rates)
    results = {}
    for mode in args.modes.split(","):
        name = "untracked" if mode == "off" else "tracked"
        mode_rates = rates if mode == "off" else tracked_rates
        results[name] = latency_mode(mode, mode_rates, args.seconds, args.max_in_flight)
    return {
        "benchmark": "latency",
        "rates_per_s": {"untracked": rates, "tracked": tracked_rates},
        "seconds_per_rate": args.seconds,
        "client_max_in_flight": args.max_in_flight,
        "results": results,
        "target": {"untracked_p50_ms": 8, "untracked_p99_ms": 25, "at_rate_per_s": 100},
    }
