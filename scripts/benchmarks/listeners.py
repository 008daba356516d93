"""listeners: memory, CPU and tick lateness of 1k, 5k and 10k live listeners in one cluster.

    python scripts/bench.py listeners [--counts 1000,5000,10000] [--seconds 75] [--interval 60s]
        [--webhook-share 0.1] [--stream-share 0.1] [--clocks-per-host N]

For each count N a fresh local cluster (``prefect: off``, its own Ray) is started from a
generated config: ``--tenants`` tenants, flows of ``--clocks-per-flow`` clocks each, every flow
the same untracked probe flow. Of the N clocks, ``1 - webhook - stream`` are interval clocks
(``every: --interval``) whose ``anchor`` options are staggered evenly over the interval, so the
cluster ticks ~N*0.8/interval times a second, evenly, not in one burst; the rest are webhook
routes and redis-stream subscriptions (each on its own, idle, stream key). Clocks are spread
round-robin over the flows, so every flow holds the same mix.

The probe flow writes one JSON line per run: the event id, the tick's scheduled time (the
``scheduled`` of a time clock's payload) and ``time.time()`` at the first line of its body.
Tick lateness = start - scheduled, for the ticks scheduled inside the measurement window.

Per count: ``start_s`` (config validated → every clock listening, Ray start included), the
total RSS (and PSS) of every process of the cluster's Ray session (the driver and all its
descendants: GCS, raylet, workers, actors), sampled over the window (peak), CPU seconds of
those processes over the window / window seconds, ticks expected (from the schedules) vs run,
lateness p50/p95/p99, the received → flow-start part measured inside the coordinator, and one
``status`` call. The baseline is the same cluster with a single webhook listener, measured in
the same run: per-listener memory = (RSS(N) - RSS(baseline)) / N.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from actors.clocks.time import parse_duration, parse_time
from benchmarks.common import summary_ms
from benchmarks.procs import cpu_by_kind, cpu_seconds, machine_busy_s, memory_sample
from cluster.config import config_from_dict
from cluster.runtime import LocalCluster

NAME = "listeners"
HELP = "RSS, CPU and tick lateness of 1k/5k/10k live listeners (interval clocks + subscriptions)"
log = logging.getLogger("bench.listeners")

REDIS_URL = "redis://127.0.0.1:6379/0"
ANCHOR_BASE = datetime(2024, 1, 1, tzinfo=UTC)
TARGET = {"listeners": 10_000, "rss_total_mb_max": 2048, "tick_lateness_p99_ms_max": 100}

PROBE = """
import json, time
from prefect import flow

LOG = {log!r}


@flow
def probe(event: dict | None = None):
    started = time.time()
    payload = event.get("payload") or {{}}
    row = {{"id": event["id"], "scheduled": payload.get("scheduled"), "started": started}}
    with open(LOG, "a") as fh:
        fh.write(json.dumps(row) + "\\n")
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", default="1000,5000,10000", help="listener counts to measure")
    parser.add_argument(
        "--seconds",
        type=float,
        default=75.0,
        help="measurement window per count (longer than --interval: every clock ticks)",
    )
    parser.add_argument("--interval", default="60s", help="every: of the interval clocks")
    parser.add_argument("--webhook-share", type=float, default=0.1)
    parser.add_argument("--stream-share", type=float, default=0.1)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--clocks-per-flow", type=int, default=100)
    parser.add_argument(
        "--clocks-per-host",
        type=int,
        default=None,
        help="cluster.clocks_per_host (default: config's)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after start-up")
    parser.add_argument("--grace", type=float, default=30.0, help="wait for late ticks' runs")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--no-baseline", action="store_true")


# -- the config ------------------------------------------------------------------------------


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def listener_config(
    n: int,
    args: argparse.Namespace,
    run_id: str,
    stream_share: float,
) -> tuple[dict[str, Any], list[float], list[str]]:
    """The config of ``n`` listeners, the anchor offsets of its interval clocks (seconds after
    ANCHOR_BASE) and its stream keys."""
    every = parse_duration(args.interval)
    n_stream = round(n * stream_share)
    n_webhook = round(n * args.webhook_share)
    n_interval = n - n_stream - n_webhook
    clocks: list[dict[str, Any]] = []
    offsets: list[float] = []
    streams: list[str] = []
    for j in range(n_interval):
        offset = round(j * every / max(1, n_interval), 6)
        offsets.append(offset)
        anchor = (ANCHOR_BASE + timedelta(seconds=offset)).isoformat()
        clocks.append({"type": "interval", "every": args.interval, "anchor": anchor})
    clocks.extend({"type": "webhook"} for _ in range(n_webhook))
    for j in range(n_stream):
        key = f"bench-listeners:{run_id}:{j}"
        streams.append(key)
        clocks.append({"type": "redis-stream", "url": REDIS_URL, "stream": key})
    n_flows = max(1, math.ceil(n / args.clocks_per_flow))
    n_tenants = max(1, min(args.tenants, n_flows))
    flows: list[dict[str, Any]] = [
        {
            "name": f"f{i:04d}",
            "tenant": f"t{i % n_tenants:02d}",
            "entrypoint": "bench_flows.py:probe",
            "retries": 0,
            "clocks": [],
        }
        for i in range(n_flows)
    ]
    for k, clock in enumerate(clocks):  # round-robin: every flow gets the same mix
        flows[k % n_flows]["clocks"].append(clock)
    tenants = [
        {
            "name": f"t{i:02d}",
            "quotas": {
                "max_listeners": max(1, n),
                "max_concurrent_runs": 1000,
                "max_events_per_second": 100_000,
            },
        }
        for i in range(n_tenants)
    ]
    cluster: dict[str, Any] = {"prefect": "off", "ingress": {"port": 0}, "workers": args.workers}
    if args.clocks_per_host:
        cluster["clocks_per_host"] = args.clocks_per_host
    return {"cluster": cluster, "tenants": tenants, "flows": flows}, offsets, streams


def expected_ticks(offsets: list[float], every: float, t0: float, t1: float) -> int:
    """Ticks of the interval clocks scheduled in ``(t0, t1]`` (wall-clock seconds)."""
    base = ANCHOR_BASE.timestamp()
    total = 0
    for off in offsets:
        start = base + off
        total += math.floor((t1 - start) / every) - math.floor((t0 - start) / every)
    return total


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return rows


def delete_streams(keys: list[str]) -> None:
    if not keys:
        return
    try:
        import redis
    except ImportError:
        return
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


# -- one measurement -------------------------------------------------------------------------


def measure(n: int, args: argparse.Namespace, stream_share: float) -> dict[str, Any]:
    every = parse_duration(args.interval)
    run_id = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="bench-listeners-") as tmp:
        root = Path(tmp)
        log_path = root / "probe.jsonl"
        (root / "bench_flows.py").write_text(PROBE.format(log=str(log_path)))
        if n == 0:  # the baseline: one webhook listener
            data: dict[str, Any] = {
                "cluster": {"prefect": "off", "ingress": {"port": 0}, "workers": args.workers},
                "flows": [
                    {
                        "name": "f0000",
                        "entrypoint": "bench_flows.py:probe",
                        "clocks": [{"type": "webhook"}],
                    }
                ],
            }
            if args.clocks_per_host:
                data["cluster"]["clocks_per_host"] = args.clocks_per_host
            offsets: list[float] = []
            streams: list[str] = []
        else:
            data, offsets, streams = listener_config(n, args, run_id, stream_share)
        t_begin = time.perf_counter()
        config = config_from_dict(data, root, str(root / "listeners.yaml"), check_entrypoints=True)
        validate_s = time.perf_counter() - t_begin
        cluster = LocalCluster(config)
        try:
            cluster.start(timeout=args.start_timeout)
            start_s = time.perf_counter() - t_begin
            log.info("%d listeners: listening after %.1fs", n, start_s)
            hosts = len(cluster.deployment.hosts) if cluster.deployment else 0
            time.sleep(args.settle)
            cluster.call("coordinator", "latencies", True)
            samples = [memory_sample()]
            cpu0, busy0, t0 = cpu_seconds(), machine_busy_s(), time.time()
            deadline = t0 + (min(args.seconds, 15.0) if n == 0 else args.seconds)
            while time.time() < deadline:
                time.sleep(min(5.0, max(0.0, deadline - time.time())))
                samples.append(memory_sample())
            cpu1, busy1, t1 = cpu_seconds(), machine_busy_s(), time.time()
            window = t1 - t0
            by_kind = cpu_by_kind(cpu0, cpu1, window)
            cpu_used = sum(by_kind.values()) * window / 100
            want = expected_ticks(offsets, every, t0, t1)
            in_window: list[dict[str, Any]] = []
            grace_end = time.time() + (args.grace if want else 0)
            while True:
                rows = read_rows(log_path)
                in_window = [
                    r
                    for r in rows
                    if r.get("scheduled") and t0 < parse_time(r["scheduled"]).timestamp() <= t1
                ]
                if len(in_window) >= want or time.time() > grace_end:
                    break
                time.sleep(0.5)
            inside = cluster.call("coordinator", "latencies", True)
            t_status = time.perf_counter()
            status = cluster.call("supervisor", "status", timeout=120)
            status_s = time.perf_counter() - t_status
            states: dict[str, int] = {}
            for f in status["flows"]:
                for c in f["clocks"]:
                    states[c["state"]] = states.get(c["state"], 0) + 1
        finally:
            cluster.stop(drain_timeout=10)
            delete_streams(streams)
    late = [r["started"] - parse_time(r["scheduled"]).timestamp() for r in in_window]
    peak = max(samples, key=lambda s: s["rss_mb"])
    last = samples[-1]
    return {
        "listeners": n,
        "interval_clocks": len(offsets),
        "stream_clocks": len(streams),
        "webhook_clocks": n - len(offsets) - len(streams) if n else 1,
        "flows": len(data["flows"]),
        "tenants": len(data.get("tenants", [])) or 1,
        "hosts": hosts,
        "validate_s": round(validate_s, 2),
        "start_s": round(start_s, 2),
        "processes": last["processes"],
        "rss_total_mb": peak["rss_mb"],
        "rss_end_mb": last["rss_mb"],
        "pss_total_mb": peak["pss_mb"],
        "rss_by_process_kind": peak["by_role"],
        "window_s": round(window, 1),
        "cpu_seconds": round(cpu_used, 1),
        "cpu_percent": round(100 * cpu_used / window, 1),
        "cpu_percent_by_process_kind": by_kind,
        # everything else on the machine over the window (other benchmarks skew the figures)
        "other_cpu_percent": round(100 * max(0.0, busy1 - busy0 - cpu_used) / window, 1),
        "ticks_expected": want,
        "ticks_run": len(in_window),
        "runs_per_s": round(len(in_window) / window, 1),
        "tick_lateness": summary_ms(late) if late else None,
        "received_to_flow_start": summary_ms(inside) if inside else None,
        "status_call_s": round(status_s, 2),
        "clock_states": states,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    def _term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # run the finally blocks: stop the cluster, drop the streams

    signal.signal(signal.SIGTERM, _term)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    notes = []
    stream_share = args.stream_share
    if stream_share and not redis_up():
        notes.append("redis is down on 127.0.0.1:6379: stream share measured as webhooks")
        args.webhook_share += stream_share
        stream_share = 0.0
    baseline = None if args.no_baseline else measure(0, args, 0.0)
    results = []
    for n in counts:
        r = measure(n, args, stream_share)
        if baseline is not None:
            extra = r["rss_total_mb"] - baseline["rss_total_mb"]
            r["rss_over_baseline_mb"] = round(extra, 1)
            r["rss_per_listener_kb"] = round(extra * 1024 / n, 1)
            r["pss_per_listener_kb"] = round(
                (r["pss_total_mb"] - baseline["pss_total_mb"]) * 1024 / n, 1
            )
        results.append(r)
    target_row = next((r for r in results if r["listeners"] >= TARGET["listeners"]), None)
    met = None
    if target_row is not None:
        p99 = (target_row["tick_lateness"] or {}).get("p99_ms", float("inf"))
        met = {
            "rss_total_under_2gb": target_row["rss_total_mb"] < TARGET["rss_total_mb_max"],
            "tick_lateness_p99_under_100ms": p99 < TARGET["tick_lateness_p99_ms_max"],
            "all_ticks_ran": target_row["ticks_run"] >= target_row["ticks_expected"],
        }
    return {
        "benchmark": "listeners",
        "interval": args.interval,
        "seconds": args.seconds,
        "shares": {
            "interval": round(1 - args.webhook_share - stream_share, 3),
            "webhook": args.webhook_share,
            "redis_stream": stream_share,
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg()},
        "baseline": baseline,
        "results": results,
        "target": TARGET,
        "target_met": met,
        "notes": notes,
    }
