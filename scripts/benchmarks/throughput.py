"""throughput: sustained events/s from source to durable ledger claim, and dispatched runs/s,
for 1, 2 and 4 coordinator shards.

    python scripts/bench.py throughput [--events 400000] [--shards 1,2,4] [--hosts 2]

Each shard count gets a fresh cluster (same Ray, fresh state dir) with ``--flows`` flows
spread over tenants. The source is a synthetic clock running inside real ListenerHosts (the
production host: clock task → outbox → msgpack batch → coordinator shards → SQLite claim →
ack), so what is measured is everything but an external service. A share of the events
(``--duplicates``) are re-sent ids, so dedup is exercised.

Phase 1 (ingest + dedup): flows paused, every event claimed durably; events/s = events acked
by the hosts / wall time. Phase 2 (dispatch): flows resumed; untracked no-op runs completed
per second while the backlog drains, for ``--dispatch-seconds``.

Baseline in the same run: the SQLite ledger's own claim rate in this process (1,000-event
transactions, no Ray, no actors): the ceiling of one shard's claim path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
import yaml

from actors.clocks import Batch, ClockSpec, EventClock, RawEvent
from actors.event import Event
from actors.ledger import SQLiteLedger
from actors.sharding import CoordinatorShards
from benchmarks.procs import cpu_by_kind, cpu_seconds, machine_busy_s
from cluster.config import load_config
from cluster.handles import RayCoordinatorHandle
from cluster.runtime import LocalCluster

NAME = "throughput"
HELP = "events/s source → durable claim, and runs/s, for 1/2/4 coordinator shards"
TARGET_EVENTS_PER_S = 100_000
OURS = re.compile(r"\((?:.*/)?(?:actors|cluster)/[^)]*\)")  # a frame in our own packages

NOOP_FLOW = """
from prefect import flow

@flow
def noop(event: dict | None = None):
    return None
"""

log = logging.getLogger("bench.throughput")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=400_000, help="new events per shard count")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--hosts", type=int, default=2, help="listener host actors")
    parser.add_argument("--flows", type=int, default=16, help="flows (4 per tenant)")
    parser.add_argument("--batch", type=int, default=1000, help="events per source read")
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of re-sent ids")
    parser.add_argument("--dispatch-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the coordinator shards and producer hosts during ingest; top functions "
        "go into the JSON",
    )


class Profiler:
    """``py-spy record`` of some processes until stopped; then the top self-time frames."""

    def __init__(self, pids: dict[str, int], out_dir: Path) -> None:
        self.files = {name: out_dir / f"{name}.txt" for name in pids}
        self.procs = [
            subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "250",
                    "-d",
                    "3600",
                    "-f",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(self.files[name]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        ]
        time.sleep(0.5)  # attached before the load starts

    def stop(self, top: int = 12) -> dict[str, Any]:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            proc.wait(timeout=60)
        return {name: top_frames(path, top) for name, path in self.files.items()}


def top_frames(path: Path, top: int) -> dict[str, Any]:
    """Self time per leaf frame and time per frame anywhere on the stack (our code only)."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        leaf[_short(frames[-1])] += n
        for f in {_short(f) for f in frames if OURS.search(f)}:
            inclusive[f] += n
    share = lambda c: [  # noqa: E731
        {"frame": f, "share": round(k / total, 3)} for f, k in c.most_common(top)
    ]
    return {"samples": total, "self": share(leaf), "inclusive_ours": share(inclusive)}


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` → ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


class GeneratorClock(EventClock):
    """A synthetic source: ``count`` events in reads of ``batch``, then idle. Every read
    after the first also re-sends ``duplicates * batch`` ids of the previous read."""

    OPTIONS = frozenset({"count", "batch", "duplicates"})

    @property
    def source(self) -> str:
        return f"bench://{self.spec.key}"

    async def batches(self) -> AsyncIterator[Batch]:
        count = int(self.spec.options["count"])
        size = int(self.spec.options["batch"])
        dups = int(size * float(self.spec.options["duplicates"]))
        self.set_listening()
        now = "2026-01-01T00:00:00+00:00"
        sent = 0
        while sent < count:
            n = min(size, count - sent)
            ids = [f"{self.name}-{i}" for i in range(sent, sent + n)]
            ids += [f"{self.name}-{i}" for i in range(max(0, sent - dups), sent)]
            yield Batch([RawEvent(i, "bench", now, {"n": i}) for i in ids])
            sent += n
        await asyncio.Event().wait()  # done: stay listening


class Producer:
    """A Ray actor around a real ListenerHost whose clocks are generators."""

    def __init__(self, host_id: str, specs: list[ClockSpec], state_dir: str, router: Any) -> None:
        # Imported here: this module travels to the actor by value, and a module-level
        # global would arrive as a copy of the registry, not the registry itself.
        from actors.clocks import CLOCK_TYPES as registry
        from actors.host import ListenerHost

        registry["bench-generator"] = GeneratorClock
        self.host = ListenerHost(host_id, specs, Path(state_dir), router)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    async def run(self, expected: int) -> dict[str, float]:
        """Start the clocks; return when ``expected`` events (new + duplicate) were acked."""
        t0 = time.perf_counter()
        await self.host.start()
        while True:
            done = sum(s["events"] for s in await self.host.clocks())
            if done >= expected:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        await self.host.stop()
        return {"events": done, "seconds": elapsed}


def bare_claim_rate(n: int, batch: int) -> float:
    """Baseline: SQLite claims in this process, no actors (new keys, 1,000 per commit)."""

    async def go() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            ledger = SQLiteLedger(Path(tmp) / "bare.db")
            events = [
                Event(f"e{i}", "t", f"f{i % 16}", "bench://bare", "bench", "", {"n": i})
                for i in range(n)
            ]
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                await ledger.claim(events[i : i + batch])
            rate = n / (time.perf_counter() - t0)
            await ledger.close()
            return rate

    return asyncio.run(go())


def write_config(root: Path, args: argparse.Namespace, shards: int) -> Path:
    (root / "bench_flows.py").write_text(NOOP_FLOW)
    tenants = max(1, args.flows // 4)
    config = {
        "cluster": {
            "prefect": "off",
            "ingress": {"port": 0},
            "workers": args.workers,
            "worker_concurrency": 64,
            "coordinator_shards": shards,
        },
        "tenants": [
            {
                "name": f"t{t}",
                "quotas": {
                    "max_events_per_second": 10_000_000,
                    "max_concurrent_runs": 64,
                    "max_pending_runs": 10_000_000,
                },
            }
            for t in range(tenants)
        ],
        "flows": [
            {
                "name": f"f{i}",
                "tenant": f"t{i % tenants}",
                "entrypoint": "bench_flows.py:noop",
                "clocks": [{"type": "webhook"}],
            }
            for i in range(args.flows)
        ],
    }
    path = root / "listeners.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def generator_specs(args: argparse.Namespace, per_flow: int) -> list[ClockSpec]:
    tenants = max(1, args.flows // 4)
    return [
        ClockSpec(
            f"t{i % tenants}",
            f"f{i}",
            "gen",
            "bench-generator",
            {"count": per_flow, "batch": args.batch, "duplicates": args.duplicates},
        )
        for i in range(args.flows)
    ]


def completed_runs(cluster: LocalCluster) -> int:
    return sum(
        f["runs"].get("completed", 0) for f in cluster.call("coordinator", "status")["flows"]
    )


def one_shard_count(args: argparse.Namespace, shards: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-thr{shards}-") as tmp:
        root = Path(tmp)
        cluster = LocalCluster(load_config(write_config(root, args, shards))).start(timeout=180)
        try:
            d = cluster.deployment
            assert d is not None
            for f in range(args.flows):
                cluster.call("coordinator", "pause", f"t{f % max(1, args.flows // 4)}", f"f{f}")
            router = CoordinatorShards(
                [RayCoordinatorHandle(h.name, h.actor, 60.0) for h in d.coordinators]
            )
            per_flow = args.events // args.flows
            specs = generator_specs(args, per_flow)
            groups = [specs[i :: args.hosts] for i in range(args.hosts)]
            remote = ray.remote(num_cpus=0)(Producer)
            producers = [
                remote.remote(f"bench-host-{i}", g, str(root / "state"), router)
                for i, g in enumerate(groups)
            ]
            ray.get([p.ready.remote() for p in producers])  # actor start-up is not ingest
            sent_per_flow = per_flow + sum(
                int(args.batch * args.duplicates) for _ in range(1, -(-per_flow // args.batch))
            )
            profiler = None
            if args.profile:
                pids = {h.name: ray.get(h.actor.ping.remote())["pid"] for h in d.coordinators}
                pids |= {f"producer-{i}": ray.get(p.pid.remote()) for i, p in enumerate(producers)}
                profiler = Profiler(pids, root)
            cpu0, busy0, t0 = cpu_seconds(), machine_busy_s(), time.perf_counter()
            results = ray.get(
                [
                    p.run.remote(sent_per_flow * len(g))
                    for p, g in zip(producers, groups, strict=True)
                ]
            )
            wall = time.perf_counter() - t0
            cpu = cpu_by_kind(cpu0, cpu_seconds(), wall)
            busy = 100 * (machine_busy_s() - busy0) / wall
            profile = profiler.stop() if profiler else None
            for p in producers:
                ray.kill(p)
            status = cluster.call("coordinator", "status", timeout=120)["flows"]
            accepted = sum(f["events"]["accepted"] for f in status)
            duplicate = sum(f["events"]["duplicate"] for f in status)
            seen = accepted + duplicate
            # Phase 2: dispatch the backlog.
            for f in range(args.flows):
                cluster.call("coordinator", "resume", f"t{f % max(1, args.flows // 4)}", f"f{f}")
            before, t1 = completed_runs(cluster), time.perf_counter()
            time.sleep(args.dispatch_seconds)
            after, t2 = completed_runs(cluster), time.perf_counter()
        finally:
            cluster.stop(drain_timeout=5)
    return {
        "shards": shards,
        "hosts": args.hosts,
        "events_sent": int(sum(r["events"] for r in results)),
        "accepted": accepted,
        "duplicate": duplicate,
        "expected_new": per_flow * args.flows,
        "ingest_seconds": round(wall, 3),
        "ingest_events_per_s": round(seen / wall),
        "new_events_per_s": round(accepted / wall),
        "dispatched_runs_per_s": round((after - before) / (t2 - t1), 1),
        # During ingest, in percent of one core: the machine's, and per kind of process.
        "ingest_machine_busy_percent": round(busy, 1),
        "ingest_cpu_percent_by_process": cpu,
        **({"profile": profile} if profile else {}),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    baseline = bare_claim_rate(min(args.events, 200_000), args.batch)
    results = []
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        for shards in (int(s) for s in args.shards.split(",")):
            results.append(one_shard_count(args, shards))
            log.warning("shards=%s: %s", shards, results[-1])
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    for r in results:
        r["ratio_to_bare_sqlite_claim"] = round(r["ingest_events_per_s"] / baseline, 3)
        r["target_met"] = r["ingest_events_per_s"] >= TARGET_EVENTS_PER_S
    return {
        "benchmark": "throughput",
        "events": args.events,
        "duplicates_share": args.duplicates,
        "flows": args.flows,
        "baseline_bare_sqlite_claim_events_per_s": round(baseline),
        "results": results,
        "target": {"ingest_events_per_s": TARGET_EVENTS_PER_S},
    }
