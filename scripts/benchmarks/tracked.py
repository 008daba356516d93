"""tracked: completed tracked (Prefect) flow runs per second through the cluster, against bare
Prefect: the same @flow called directly in a loop from the same number of processes, against
the same Prefect server (the cluster's embedded one). Target: ≥ 90% of bare.

Cluster: ``prefect: embedded``, ``workers: W``; N events are POSTed to the ingress as fast as
it takes them; the rate is N / (first POST → last run completed in the ledger).
The two sides alternate in ``--rounds`` rounds (a share of the runs each, the first side
alternating too), so a change of the machine's load or the server's growing database weighs
on both alike.
Bare: W plain Python processes, each with ``PREFECT_API_URL`` set to the cluster's server and
flow-run heartbeats off (as the cluster's worker runs flows), import the flow, wait for a
common start signal, then call it N/W times; the rate is N / (start → last process done).

    python scripts/bench.py tracked [--runs 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks._load import fire
from cluster.runtime import LocalCluster

NAME = "tracked"
HELP = "tracked flow runs/s through the cluster vs bare Prefect on the same server"
log = logging.getLogger("bench.tracked")
TARGET_RATIO = 0.9

FLOW = """
import json, time
from prefect import flow

@flow
def probe(event: dict | None = None):
    with open({log!r}, "a") as fh:
        fh.write(json.dumps({{"id": event["id"], "at": time.time()}}) + "\\n")
"""

# One bare process: the flow called directly, N times, after a start signal on stdin.
BARE = """
import json, sys, time
sys.path.insert(0, {root!r})
from prefect.context import SettingsContext, get_settings_context
from bench_flows import probe

n, tag, named = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "named"
flow_obj = probe
if named:  # the cluster's run name and tags: one more API call a run (the rename)
    from prefect import tags
    from actors.flow_runner import run_name_for, run_tags_for
    current = {{}}
    flow_obj = probe.with_options(flow_run_name=lambda: current["name"])
base = get_settings_context()
settings = base.settings.copy_with_update(
    updates={{"flows.heartbeat_frequency": None, "server.ephemeral.enabled": False}}
)
with SettingsContext(profile=base.profile, settings=settings):
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    failed = 0
    for i in range(n):
        event = {{"id": f"{{tag}}-{{i}}", "tenant": "bench", "flow": "probe", "payload": {{}}}}
        if named:
            current["name"] = run_name_for(event, 1, "probe")
            with tags(*run_tags_for(event, 1, "probe")):
                state = flow_obj(event=event, return_state=True)
        else:
            state = flow_obj(event=event, return_state=True)
        failed += 0 if state.is_completed() else 1
    end = time.time()
print(json.dumps({{"start": start, "end": end, "runs": n, "failed": failed}}), flush=True)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=200, help="tracked runs per side")
    parser.add_argument("--workers", type=int, default=2, help="worker actors = bare processes")
    parser.add_argument(
        "--worker-concurrency", type=int, default=16, help="runs in flight per worker"
    )
    parser.add_argument(
        "--tracked-concurrency",
        type=int,
        default=None,
        help="tracked runs in flight per worker (default: the config's default)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate cluster and bare this many times"
    )
    parser.add_argument(
        "--named-bare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run bare Prefect with the cluster's run names and tags (splits the gap)",
    )


def start_cluster(
    root: Path, workers: int, concurrency: int, tracked: int | None = None
) -> LocalCluster:
    return common.start_cluster(
        root,
        "embedded",
        flow_source=FLOW,
        log_name="runs.jsonl",
        workers=workers,
        max_concurrent_runs=1000,
        worker_concurrency=concurrency,
        **({"tracked_concurrency": tracked} if tracked else {}),
    )


def completed_runs(cluster: LocalCluster, prefix: str) -> list[dict[str, Any]]:
    runs = cluster.call("coordinator", "runs", None, None, None, 1_000_000, timeout=60)
    return [r for r in runs if r["event_id"].startswith(prefix)]


def cluster_side(cluster: LocalCluster, n: int, tag: str, timeout: float) -> dict[str, Any]:
    url = f"{cluster.ingress_url}/v1/events/bench/probe"
    t0 = time.time()
    load = asyncio.run(fire(url, rate=5000, n=n, tag=tag, max_connections=64))
    posted = time.time()
    deadline = time.monotonic() + timeout
    while True:
        runs = completed_runs(cluster, f"{tag}-")
        done = [r for r in runs if r["state"] == "completed"]
        final = [r for r in runs if r["state"] in ("completed", "dead")]
        if len(final) >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)} of {n} tracked runs completed in {timeout}s")
        time.sleep(0.25)
    end = max(r["updated"] for r in done) if done else time.time()
    tracked = sum(1 for r in done if r["prefect_flow_run_id"])
    return {
        "runs": n,
        "completed": len(done),
        "retried_attempts": sum(r["attempts"] for r in runs) - len(runs),
        "with_prefect_flow_run_id": tracked,
        "post_seconds": round(posted - t0, 3),
        "seconds": round(end - t0, 3),
        "runs_per_s": round(len(done) / (end - t0), 2),
        "ingress": load.summary(5000),
    }


def shares(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one side: counts and seconds added up, the rate over the whole."""
    out: dict[str, Any] = {}
    keys = ("processes", "runs", "completed", "with_prefect_flow_run_id", "retried_attempts")
    for key in (*keys, "seconds"):
        if all(key in p for p in parts):
            out[key] = parts[0][key] if key == "processes" else sum(p[key] for p in parts)
    out["seconds"] = round(out["seconds"], 3)
    out["runs_per_s"] = round(out["completed"] / out["seconds"], 2)
    out["rounds_runs_per_s"] = [p["runs_per_s"] for p in parts]
    return out


def bare_side(
    root: Path,
    api_url: str,
    workers: int,
    n: int,
    timeout: float,
    tag: str = "",
    named: bool = False,
) -> dict[str, Any]:
    script = root / "bare_runner.py"
    script.write_text(BARE.format(root=str(root)))
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    }
    per = shares(n, workers)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(k),
                f"bare{tag}p{i}{'n' if named else ''}",
                "named" if named else "plain",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=root,
            env=env,
        )
        for i, k in enumerate(per)
    ]
    try:
        for p in procs:  # every process has imported Prefect and the flow
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"bare process did not start: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    ok = sum(r["runs"] - r["failed"] for r in results)
    return {
        "processes": workers,
        "runs": n,
        "completed": ok,
        "seconds": round(end - start, 3),
        "runs_per_s": round(ok / (end - start), 2),
        "per_process_runs_per_s": [
            round((r["runs"] - r["failed"]) / (r["end"] - r["start"]), 2) for r in results
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-tracked-") as tmp:
        root = Path(tmp)
        cluster = start_cluster(
            root, args.workers, args.worker_concurrency, args.tracked_concurrency
        )
        tracked_concurrency = cluster.config.cluster.tracked_concurrency
        try:
            assert cluster.prefect_api_url is not None
            warm = cluster_side(cluster, 4 * args.workers, "warm", args.timeout)
            log.info("warm-up: %s", warm)
            api, w, t = cluster.prefect_api_url, args.workers, args.timeout
            rounds: dict[str, list[dict[str, Any]]] = {"cluster": [], "bare": [], "named": []}
            # Alternate the sides, a share of the runs each round, so a change in the
            # machine's load (or the server's database growing) weighs on both alike.
            # Which side goes first alternates too: the server's database grows as runs
            # are written, so the side that runs later in a round meets a bigger one.
            for r, n in enumerate(shares(args.runs, args.rounds)):
                sides = {
                    "cluster": lambda n=n, r=r: cluster_side(cluster, n, f"c{r}", t),
                    "bare": lambda n=n, r=r: bare_side(root, api, w, n, t, tag=f"r{r}"),
                }
                if args.named_bare:
                    sides["named"] = lambda n=n, r=r: bare_side(
                        root, api, w, n, t, f"r{r}", named=True
                    )
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for side in order:
                    rounds[side].append(sides[side]())
                log.info(
                    "round %d: %s", r, {k: v[-1]["runs_per_s"] for k, v in rounds.items() if v}
                )
            ours, bare = combine(rounds["cluster"]), combine(rounds["bare"])
            named = combine(rounds["named"]) if args.named_bare else None
        finally:
            cluster.stop(drain_timeout=30)
    return {
        "benchmark": "tracked",
        "workers": args.workers,
        "worker_concurrency": args.worker_concurrency,
        "tracked_concurrency": tracked_concurrency,
        "runs": args.runs,
        "rounds": args.rounds,
        "cluster": ours,
        "bare_prefect": bare,
        "ratio_to_bare": round(ours["runs_per_s"] / bare["runs_per_s"], 3),
        # each round's ratio (the two sides ran back to back): how much one round swings
        "rounds_ratio_to_bare": [
            round(c / b, 3)
            for c, b in zip(ours["rounds_runs_per_s"], bare["rounds_runs_per_s"], strict=True)
        ],
        **(
            {
                "bare_prefect_named_like_cluster": named,
                "ratio_to_bare_named": round(ours["runs_per_s"] / named["runs_per_s"], 3),
            }
            if named
            else {}
        ),
        "target": {"ratio_to_bare": TARGET_RATIO},
    }
