"""Chaos run: events through the directory, S3 and emit paths while actors are killed.

    python scripts/chaos.py --events 100000 --kill-every 2-5

Kills listener hosts, the coordinator and workers at random intervals, half with SIGKILL to the
actor's process and half with ``ray.kill`` (Ray restarts both). At the end it checks the ledger
and the flow's own side-effect log and prints one JSON document:

- ``lost``: events sent but without a completed run;
- ``duplicate_completions``: the same attempt of an event executed twice (the dedup failed);
- ``reexecutions``: events whose flow body ran more than once because a worker was killed
  mid-run (a new attempt, by design: side effects are at-least-once, runs are exactly-once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import ray
import yaml
from moto.server import ThreadedMotoServer

from cluster.config import load_config
from cluster.runtime import LocalCluster

FLOW = """
import json, os
from prefect import flow
from actors.flow_runner import current_attempt

@flow
def chaos(event: dict | None = None):
    line = json.dumps({{"id": event["id"], "attempt": current_attempt(), "pid": os.getpid()}})
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)
"""


class Chaos:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.sent: list[str] = []
        self.lock = threading.Lock()
        self.kills: Counter[str] = Counter()
        self.stop = threading.Event()

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "chaos")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "chaos")
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.s3.create_bucket(Bucket="chaos")
        (self.root / "inbox").mkdir()
        (self.root / "flows.py").write_text(FLOW.format(log=str(self.root / "ran.jsonl")))
        config = {
            "cluster": {
                "prefect": "off",
                "ingress": {"port": 0},
                "workers": 2,
                "heartbeat_seconds": 0.5,
            },
            "tenants": [
                {
                    "name": "default",
                    "quotas": {"max_events_per_second": 1_000_000, "max_concurrent_runs": 32},
                }
            ],
            "flows": [
                {
                    "name": "chaos",
                    "entrypoint": "flows.py:chaos",
                    "retries": 20,
                    "retry_delay": "100ms",
                    "clocks": [
                        {
                            "type": "directory",
                            "path": "./inbox",
                            "pattern": "*.json",
                            "poll_interval": 0.5,
                        },
                        {
                            "type": "s3",
                            "bucket": "chaos",
                            "endpoint_url": endpoint,
                            "poll_interval": 0.2,
                        },
                        {"type": "webhook"},
                    ],
                }
            ],
        }
        (self.root / "listeners.yaml").write_text(yaml.safe_dump(config))
        self.cluster = LocalCluster(load_config(self.root / "listeners.yaml")).start(timeout=180)

    def close(self) -> None:
        self.cluster.stop(drain_timeout=10)
        self.moto.stop()

    # -- producers ------------------------------------------------------------------------
    def _record(self, event_id: str) -> None:
        with self.lock:
            self.sent.append(event_id)

    def produce_files(self, n: int) -> None:
        inbox = self.root / "inbox"
        for i in range(n):
            path = inbox / f"f-{i}.json"
            tmp = inbox / f".f-{i}.tmp"
            tmp.write_text(json.dumps({"i": i}))
            os.replace(tmp, path)
            st = path.stat()
            self._record(f"{path}@{st.st_size}@{st.st_mtime_ns}")
            self._pace()

    def produce_objects(self, n: int) -> None:
        for i in range(n):
            r = self.s3.put_object(Bucket="chaos", Key=f"o-{i}", Body=b"x")
            self._record(f"chaos/o-{i}@{r['ETag'].strip(chr(34))}")
            self._pace()

    def produce_emits(self, n: int) -> None:
        url = f"{self.cluster.ingress_url}/v1/events/default/chaos"
        with httpx.Client(timeout=30) as client:
            for i in range(n):
                eid = f"e-{i}"
                while True:
                    try:
                        r = client.post(url, json={"id": eid, "payload": {"i": i}})
                        if r.status_code in (200, 202):
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
                self._record(eid)
                self._pace()

    def _pace(self) -> None:
        if self.args.rate:
            time.sleep(3.0 / self.args.rate)

    # -- the killer -----------------------------------------------------------------------
    def kill_loop(self) -> None:
        lo, hi = (float(x) for x in self.args.kill_every.split("-"))
        d = self.cluster.deployment
        targets = {"host": d.hosts, "coordinator": d.coordinators, "worker": d.workers}
        # Every (kind, method) pair in turn, shuffled per round: several kills of each kind.
        plan: list[tuple[str, str]] = []
        while not self.stop.wait(random.uniform(lo, hi)):
            if not plan:
                plan = [(k, h) for k in targets for h in ("sigkill", "ray.kill")]
                random.shuffle(plan)
            kind, how = plan.pop()
            handle = random.choice(targets[kind])
            try:
                if how == "sigkill":
                    pid = ray.get(handle.actor.ping.remote(), timeout=10)["pid"]
                    os.kill(pid, signal.SIGKILL)
                else:
                    ray.kill(handle.actor, no_restart=False)
                self.kills[f"{kind}:{how}"] += 1
            except Exception as exc:  # the actor may be restarting from the previous kill
                self.kills[f"skipped:{type(exc).__name__}"] += 1

    # -- verdict --------------------------------------------------------------------------
    def completed_ids(self) -> set[str]:
        db = sqlite3.connect(self.cluster.state_dir / "ledger.db", timeout=30)
        try:
            rows = db.execute("SELECT event_id FROM runs WHERE state = 'completed'").fetchall()
        finally:
            db.close()
        return {r[0] for r in rows}

    def verdict(self, wall: float) -> dict[str, Any]:
        sent = set(self.sent)
        deadline = time.monotonic() + self.args.settle
        while time.monotonic() < deadline and not sent <= self.completed_ids():
            time.sleep(1)
        done = self.completed_ids()
        log = [json.loads(x) for x in (self.root / "ran.jsonl").read_text().splitlines() if x]
        per_attempt = Counter((r["id"], r["attempt"]) for r in log)
        per_id = Counter(r["id"] for r in log)
        return {
            "benchmark": "chaos",
            "events_sent": len(sent),
            "runs_completed": len(done & sent),
            "lost": len(sent - done),
            "duplicate_completions": sum(1 for n in per_attempt.values() if n > 1),
            "reexecutions": sum(n - 1 for n in per_id.values() if n > 1),
            "kills": dict(self.kills),
            "wall_seconds": round(wall, 1),
            "events_per_second": round(len(done & sent) / wall, 1),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        chaos = Chaos(Path(tmp), args)
        chaos.start()
        try:
            t0 = time.monotonic()
            killer = threading.Thread(target=chaos.kill_loop, daemon=True)
            killer.start()
            third = args.events // 3
            with ThreadPoolExecutor(3) as pool:
                futures = [
                    pool.submit(chaos.produce_files, third),
                    pool.submit(chaos.produce_objects, third),
                    pool.submit(chaos.produce_emits, args.events - 2 * third),
                ]
                for f in futures:
                    f.result()
            chaos.stop.set()
            killer.join()
            return chaos.verdict(time.monotonic() - t0)
        finally:
            chaos.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--kill-every", default="2-5", help="seconds between kills: lo-hi")
    parser.add_argument(
        "--rate", type=float, default=0, help="events/s cap (0: as fast as possible)"
    )
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait for the backlog")
    doc = run(parser.parse_args())
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if doc["lost"] == 0 and doc["duplicate_completions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
