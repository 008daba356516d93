"""Benchmarks. Each prints one JSON document on stdout.

    python scripts/bench.py latency [--rate 100] [--seconds 10] [--modes off,embedded]

latency: event → flow-start for events POSTed to the ingress (as ``listeners emit`` does) at a
steady rate. "sent" is taken by the client right before the POST; "start" is the first line
of the flow body. Also reports the ingress→start part measured inside the cluster, and, as the
same-run baseline, the bare HTTP round trip to the ingress's health endpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.config import load_config
from cluster.runtime import LocalCluster

PROBE_FLOW = """
import json, time
from prefect import flow

@flow
def probe(event: dict | None = None):
    started = time.time()
    with open({log!r}, "a") as fh:
        fh.write(json.dumps({{"id": event["id"], "sent": event["payload"]["sent"],
                             "started": started}}) + "\\n")
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p95_ms": round(pct(ms, 95), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }


def start_cluster(root: Path, prefect: str) -> LocalCluster:
    log = root / "probe.jsonl"
    (root / "bench_flows.py").write_text(PROBE_FLOW.format(log=str(log)))
    config = {
        "cluster": {"prefect": prefect, "ingress": {"port": 0}, "workers": 2},
        "tenants": [
            {
                "name": "bench",
                "quotas": {"max_events_per_second": 100_000, "max_concurrent_runs": 64},
            }
        ],
        "flows": [
            {
                "name": "probe",
                "tenant": "bench",
                "entrypoint": "bench_flows.py:probe",
                "clocks": [{"type": "webhook"}],
            }
        ],
    }
    (root / "listeners.yaml").write_text(yaml.safe_dump(config))
    return LocalCluster(load_config(root / "listeners.yaml")).start(timeout=180)


def send_steady(client: httpx.Client, url: str, rate: float, n: int, tag: str) -> None:
    interval = 1.0 / rate
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        r = client.post(url, json={"id": f"{tag}-{i}", "payload": {"sent": time.time()}})
        if r.status_code != 202:
            raise RuntimeError(f"ingress answered {r.status_code}: {r.text}")


def wait_lines(log: Path, n: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = log.read_text().splitlines() if log.exists() else []
        if len(rows) >= n:
            return [json.loads(r) for r in rows]
        time.sleep(0.1)
    raise RuntimeError(f"only {len(rows)} of {n} runs started within {timeout}s")


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


def bench_latency(args: argparse.Namespace) -> dict[str, Any]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    lat = sub.add_parser("latency", help="event → flow-start latency")
    lat.add_argument("--rate", type=float, default=100.0)
    lat.add_argument("--seconds", type=float, default=10.0)
    lat.add_argument("--modes", default="off,embedded")
    lat.add_argument(
        "--tracked-rate",
        type=float,
        default=5.0,
        help="rate for tracked runs (a SQLite Prefect server sustains ~10 tracked runs/s)",
    )
    from benchmarks import ingress_server, peer_prefect, sources

    peer_prefect.add_arguments(sub.add_parser("peer-prefect", help=peer_prefect.HELP))
    sources.add_arguments(sub.add_parser("sources", help=sources.HELP))
    ingress_server.add_arguments(sub.add_parser("ingress-server", help=ingress_server.HELP))
    args = parser.parse_args()
    runners = {"latency": bench_latency, "peer-prefect": peer_prefect.run, "sources": sources.run}
    runners["ingress-server"] = ingress_server.run
    doc = runners[args.name](args)
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
