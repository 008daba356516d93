"""Helpers the benchmarks share: the probe flow, a one-flow webhook cluster, percentiles."""

from __future__ import annotations

import json
import statistics
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


def start_cluster(
    root: Path,
    prefect: str,
    *,
    flow_source: str = PROBE_FLOW,
    log_name: str = "probe.jsonl",
    workers: int = 2,
    max_concurrent_runs: int = 64,
    **cluster_options: Any,
) -> LocalCluster:
    """A cluster with one webhook flow ``bench/probe`` whose body is ``flow_source`` (a
    template with ``{log}``, the file it appends its rows to)."""
    (root / "bench_flows.py").write_text(flow_source.format(log=str(root / log_name)))
    config = {
        "cluster": {"prefect": prefect, "ingress": {"port": 0}, "workers": workers}
        | cluster_options,
        "tenants": [
            {
                "name": "bench",
                "quotas": {
                    "max_events_per_second": 100_000,
                    "max_concurrent_runs": max_concurrent_runs,
                },
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
