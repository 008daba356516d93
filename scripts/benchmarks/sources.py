"""sources: per connector, event → flow-start latency and sustained events/s into the ledger.

    python scripts/bench.py sources [--latency-events 20] [--latency-rate 10]
        [--throughput-events 2000] [--only directory,webhook,...] [--timeout 120]

One shared local Ray (``ray.init(address="local")``), one moto server in this process for the
AWS connectors, and per connector one LocalCluster (``prefect: off``, ingress port 0) with two
flows, each fed by its own fresh source (queue, stream, table, bucket, folder):

latency (flow ``probe``): after a 3-event warm-up, ``--latency-events`` messages are published
    at ``--latency-rate``/s. Each message carries its send time (``time.time()`` right before
    the publish call): in the JSON body for the message connectors (redis-stream, nats, amqp,
    mqtt, postgres rows, sqs) and the webhook's payload; in the file content for ``directory``
    (the clock parses ``*.json`` into ``payload.content``); in the object *key* for ``s3`` and
    ``s3-sqs`` (their events carry no body). The probe flow's first line records
    ``time.time()``; latency = start - send, so it includes the publish call itself and, for
    polling sources, the poll interval.
throughput (flow ``sink``, paused so no runs compete with ingestion): ``--throughput-events``
    messages are published as fast as the publisher goes (batched or concurrent per service);
    the clock is fed with its fastest sensible options (short polls, ``max_batch`` 1000). The
    time runs from the first publish until the ledger's ``accepted`` counter of the flow
    (``coordinator.status``) reaches N; ``publish_seconds`` is the publisher alone.

A connector whose service does not answer on its port is reported as ``{"skipped": reason}``;
one that fails as ``{"error": ...}``. Everything created is deleted on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from benchmarks._sources_publishers import SOURCES, Source
from benchmarks.common import summary_ms
from cluster.config import load_config
from cluster.runtime import LocalCluster

HELP = "per connector: event → flow-start latency and sustained events/s into the ledger"
AWS = {"s3", "sqs", "s3-sqs"}
WARMUP = 3

FLOWS = """
import json, time
from prefect import flow

@flow
def probe(event: dict | None = None):
    started = time.time()
    payload = dict(event["payload"])
    payload.pop("fields", None)
    with open({log!r}, "a") as fh:
        fh.write(json.dumps({{"id": event["id"], "started": started, "payload": payload}}) + "\\n")

@flow
def sink(event: dict | None = None):
    pass
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-events", type=int, default=20)
    parser.add_argument("--latency-rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--throughput-events", type=int, default=2000)
    parser.add_argument("--only", default=",".join(SOURCES), help="comma-separated clock types")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait per phase for the ledger"
    )


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM → SystemExit, so the cleanup runs when the benchmark is killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)  # before ray.init: the clock actors inherit them
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def shared_ray() -> Iterator[None]:
    """One local Ray for every cluster; never a bare ``ray.init()`` (it may join a stale one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def start_cluster(root: Path, kind: str, lat: Source, thr: Source) -> LocalCluster:
    (root / "bench_flows.py").write_text(FLOWS.format(log=str(root / "probe.jsonl")))
    config = {
        "cluster": {"prefect": "off", "ingress": {"port": 0}, "workers": 2},
        "tenants": [
            {
                "name": "bench",
                "quotas": {"max_events_per_second": 100_000, "max_concurrent_runs": 64},
            }
        ],
        "flows": [
            {
                "name": flow,
                "tenant": "bench",
                "entrypoint": f"bench_flows.py:{flow}",
                "clocks": [{"type": kind, **source.options()}],
            }
            for flow, source in (("probe", lat), ("sink", thr))
        ],
    }
    (root / "listeners.yaml").write_text(yaml.safe_dump(config))
    return LocalCluster(load_config(root / "listeners.yaml")).start(timeout=120)


def probe_rows(log: Path, n: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[str] = []
    while time.monotonic() < deadline:
        rows = log.read_text().splitlines() if log.exists() else []
        if len(rows) >= n:
            return [json.loads(r) for r in rows]
        time.sleep(0.05)
    raise RuntimeError(f"only {len(rows)} of {n} probe runs started within {timeout:.0f}s")


async def publish_steady(source: Source, n: int, rate: float, tag: str) -> None:
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await source.publish(i, time.time(), tag)


async def latency_phase(
    cluster: LocalCluster, root: Path, source: Source, args: argparse.Namespace
) -> dict[str, Any]:
    log = root / "probe.jsonl"
    await publish_steady(source, WARMUP, args.latency_rate, "warm")
    await asyncio.to_thread(probe_rows, log, WARMUP, args.timeout)
    log.unlink()
    n = args.latency_events
    await publish_steady(source, n, args.latency_rate, "lat")
    rows = await asyncio.to_thread(probe_rows, log, n, args.timeout)
    s = summary_ms([r["started"] - source.sent_of(r["payload"]) for r in rows])
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "n": s["n"], "mean_ms": s["mean_ms"]}


def accepted(cluster: LocalCluster, flow: str) -> int:
    for f in cluster.call("coordinator", "status")["flows"]:
        if f["flow"] == flow:
            return int(f["events"]["accepted"])
    return 0


def watch_ledger(
    cluster: LocalCluster, n: int, timeout: float, out: dict[str, Any], stop: threading.Event
) -> None:
    """In a thread: poll the ``sink`` flow's accepted counter until it reaches ``n``."""
    deadline = time.monotonic() + timeout
    count = 0
    while not stop.is_set() and time.monotonic() < deadline:
        count = accepted(cluster, "sink")
        if count >= n:
            break
        time.sleep(0.02)
    out["accepted"] = count
    out["done"] = time.perf_counter()


async def throughput_phase(
    cluster: LocalCluster, source: Source, args: argparse.Namespace
) -> dict[str, Any]:
    n = args.throughput_events
    out: dict[str, Any] = {}
    stop = threading.Event()
    watcher = threading.Thread(
        target=watch_ledger, args=(cluster, n, args.timeout, out, stop), daemon=True
    )
    t0 = time.perf_counter()
    watcher.start()
    try:
        await source.publish_many(n, "thr")
        published = time.perf_counter() - t0
    except BaseException:
        stop.set()
        raise
    finally:
        await asyncio.to_thread(watcher.join, args.timeout + 30)
    seconds = out["done"] - t0
    result = {
        "events": out["accepted"],
        "seconds": round(seconds, 3),
        "events_per_second": round(out["accepted"] / seconds, 1),
        "publish_seconds": round(published, 3),
    }
    if out["accepted"] < n:
        result["timed_out"] = f"{out['accepted']} of {n} accepted within {args.timeout:.0f}s"
    return result


async def bench_one(kind: str, root: Path, ctx: dict[str, Any], args: argparse.Namespace) -> Any:
    cls = SOURCES[kind]
    reason = cls.unavailable()
    if reason:
        return {"skipped": reason}
    tag = f"bench-{os.getpid()}-{kind}"
    lat, thr = cls(f"{tag}-lat", ctx), cls(f"{tag}-thr", ctx)
    lat.flow, thr.flow = "probe", "sink"
    async with contextlib.AsyncExitStack() as stack:
        for source in (lat, thr):
            await source.setup()
            stack.push_async_callback(source.teardown)
        t0 = time.perf_counter()
        cluster = await asyncio.to_thread(start_cluster, root, kind, lat, thr)
        # stop in a thread: LocalCluster drives its own event loop, this one is running
        stack.push_async_callback(asyncio.to_thread, cluster.stop, 5)
        started = time.perf_counter() - t0
        ctx["ingress"] = cluster.ingress_url
        await asyncio.to_thread(cluster.call, "coordinator", "pause", "bench", "sink")
        latency = await latency_phase(cluster, root, lat, args)
        throughput = await throughput_phase(cluster, thr, args)
    return {
        "latency": latency,
        "throughput": throughput,
        "cluster_start_s": round(started, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    load_before = os.getloadavg()
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(SOURCES))
    if unknown:
        raise SystemExit(f"unknown clock types: {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_raises())
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-sources-", ignore_cleanup_errors=True)
        )
        ctx: dict[str, Any] = {"root": tmp}
        if AWS & set(kinds):
            ctx["moto"] = stack.enter_context(moto_server())
        stack.enter_context(shared_ray())
        for kind in kinds:
            root = Path(tmp) / kind
            root.mkdir()
            try:
                results[kind] = asyncio.run(bench_one(kind, root, ctx, args))
            except Exception as exc:  # one broken connector must not hide the others
                traceback.print_exc()
                results[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "benchmark": "sources",
        "latency_events": args.latency_events,
        "latency_rate_per_s": args.latency_rate,
        "throughput_events": args.throughput_events,
        "results": results,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
