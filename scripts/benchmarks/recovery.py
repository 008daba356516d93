"""recovery: time from ``kill -9`` of the coordinator (and of a listener host) until events
flow again, and the backlog drain rate afterwards. Target: ≤ 3 s.

A cluster (untracked) runs two flows: ``hook`` fed through the HTTP ingress by an open-loop
client (503 + Retry-After honoured, retried with the same event id) and ``stream`` fed by a
host-owned redis-stream clock. Both get ``--rate`` events/s for the whole run. Each
repetition SIGKILLs the coordinator's process, waits until both flows have caught up, then
SIGKILLs the listener host's process and waits again. Per kill it reports:

- ``actor_back_s``: kill → the restarted actor answers a call that does not start it (Ray's
  restart of the process plus the actor's constructor);
- ``kill_to_first_202_s`` (coordinator): kill → the first 202 to a request sent after the kill;
- ``kill_to_first_new_run_s`` per flow: kill → the first flow run of an event sent after it;
- ``backlog_events``: the events waiting at the worst moment, above the steady-state level;
- ``drain_s`` and ``drain_rate_per_s``: from the first new run until the backlog is gone, and
  the runs/s started meanwhile.

At the end every event must have exactly one run (``lost``/``duplicated`` count the others).
The baseline, measured in the same run before any kill, is the steady event → start latency.

    python scripts/bench.py recovery [--rate 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from benchmarks._load import BackgroundLoad, LoadResult
from benchmarks.common import summary_ms
from cluster.config import load_config
from cluster.runtime import LocalCluster

NAME = "recovery"
HELP = "kill -9 of the coordinator / a listener host: time until events flow again"
log = logging.getLogger("bench.recovery")

FLOW = """
import json, time
from prefect import flow

@flow
def probe(event: dict | None = None):
    started = time.time()
    p = event["payload"]
    body = p.get("body", p)  # a redis-stream entry carries our body under "body"
    line = json.dumps({{"flow": event["flow"], "key": body["key"], "sent": body["sent"],
                       "started": started}})
    with open({log!r}, "a") as fh:
        fh.write(line + "\\n")
"""
REDIS_URL = "redis://127.0.0.1:6379/0"
TARGET_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=100.0, help="events/s into EACH source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--gap", type=float, default=3.0, help="steady seconds between kills")
    parser.add_argument(
        "--recover-timeout", type=float, default=60.0, help="give up on one kill after this"
    )
    parser.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat_seconds")
    parser.add_argument("--targets", default="coordinator,host", help="what to kill")


# -- the stream source ----------------------------------------------------------------------
class StreamLoad:
    """XADD ``{"key": "<tag>-<i>", "sent": t}`` entries at ``rate``/s on a thread."""

    def __init__(self, stream: str, rate: float, tag: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(REDIS_URL)
        self.stream, self.rate, self.tag = stream, rate, tag
        self.sent: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="load-stream", daemon=True)

    def _main(self) -> None:
        t0 = time.perf_counter()
        i = 0
        while not self._stop.is_set():
            delay = t0 + i / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            key, now = f"{self.tag}-{i}", time.time()
            self.redis.xadd(self.stream, {"data": json.dumps({"key": key, "sent": now})})
            self.sent.append((key, now))
            i += 1

    def start(self) -> StreamLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def cleanup(self) -> None:
        self.redis.delete(self.stream)
        self.redis.close()


class RunLog:
    """The flow-written rows, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.rows
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self.rows.extend(json.loads(line) for line in lines if line.strip())
        return self.rows


# -- analysis -------------------------------------------------------------------------------
class Series:
    """Sent and started times of one flow: lag(t) = sent by t - started by t."""

    def __init__(self, sent: list[float], started: list[float]) -> None:
        self.sent = sorted(sent)
        self.started = sorted(started)

    def lag(self, t: float) -> int:
        return bisect.bisect_right(self.sent, t) - bisect.bisect_right(self.started, t)

    def started_between(self, a: float, b: float) -> int:
        return bisect.bisect_right(self.started, b) - bisect.bisect_right(self.started, a)


def steady_lag(series: Series, t0: float, t1: float, step: float = 0.01) -> float:
    samples = [series.lag(t0 + k * step) for k in range(int((t1 - t0) / step))]
    return statistics.median(samples) if samples else 0.0


def drain(
    series: Series, rows: list[dict[str, Any]], t_kill: float, base_lag: float, horizon: float
) -> dict[str, Any]:
    """First new run after ``t_kill``, backlog peak, and how fast it drained."""
    new = [r["started"] for r in rows if r["sent"] > t_kill]
    if not new:
        return {"kill_to_first_new_run_s": None, "error": "no run of an event sent after kill"}
    t_resume = min(new)
    step = 0.005
    grid = [t_kill + k * step for k in range(int(horizon / step))]
    peak = max(series.lag(t) for t in grid if t <= t_resume + 5) if grid else 0
    slack = max(2.0, base_lag * 1.5)
    t_caught = next((t for t in grid if t >= t_resume and series.lag(t) <= base_lag + slack), None)
    out: dict[str, Any] = {
        "kill_to_first_new_run_s": round(t_resume - t_kill, 3),
        "backlog_events": round(peak - base_lag),
        "caught_up_s_after_kill": None if t_caught is None else round(t_caught - t_kill, 3),
    }
    if t_caught is not None:
        span = max(t_caught - t_resume, step)
        out["drain_s"] = round(t_caught - t_resume, 3)
        out["drain_rate_per_s"] = round(series.started_between(t_resume, t_caught) / span, 1)
    return out


def first_202_after(load: LoadResult, t_kill: float) -> float | None:
    times = [t for r in load.requests if r.sent > t_kill for t, s in r.answers if s == 202]
    return round(min(times) - t_kill, 3) if times else None


def outage_answers(load: LoadResult, t_kill: float, until: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in load.requests:
        for t, s in r.answers:
            if t_kill <= t <= until:
                counts[str(s)] += 1
    return dict(counts)


def p50_max(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "p50": None, "max": None, "missing": len(values)}
    return {
        "n": len(got),
        "p50": round(statistics.median(got), 3),
        "max": round(max(got), 3),
        "missing": len(values) - len(got),
    }


# -- the run --------------------------------------------------------------------------------
def start_cluster(root: Path, stream: str, heartbeat: float) -> LocalCluster:
    (root / "bench_flows.py").write_text(FLOW.format(log=str(root / "runs.jsonl")))
    clock = {
        "type": "redis-stream",
        "url": REDIS_URL,
        "stream": stream,
        "block_ms": 100,
        "max_batch": 1000,
    }
    config = {
        "cluster": {
            "prefect": "off",
            "ingress": {"port": 0},
            "workers": 2,
            "heartbeat_seconds": heartbeat,
        },
        "tenants": [
            {
                "name": "bench",
                "quotas": {"max_events_per_second": 100_000, "max_concurrent_runs": 64},
            }
        ],
        "flows": [
            {
                "name": "hook",
                "tenant": "bench",
                "entrypoint": "bench_flows.py:probe",
                "clocks": [{"type": "webhook"}],
            },
            {
                "name": "stream",
                "tenant": "bench",
                "entrypoint": "bench_flows.py:probe",
                "clocks": [clock],
            },
        ],
    }
    (root / "listeners.yaml").write_text(yaml.safe_dump(config))
    return LocalCluster(load_config(root / "listeners.yaml")).start(timeout=180)


def wait_caught_up(
    runlog: RunLog,
    flows: list[str],
    t_kill: float,
    sent_count: dict[str, Any],
    base_lag: dict[str, float],
    timeout: float,
) -> bool:
    """Online: every affected flow ran an event sent after the kill and its lag is back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = runlog.poll()
        done = True
        for flow in flows:
            mine = [r for r in rows if r["flow"] == flow]
            if not any(r["sent"] > t_kill for r in mine[-2000:]):
                done = False
                break
            lag = sent_count[flow]() - len(mine)
            if lag > base_lag[flow] + max(2.0, base_lag[flow] * 1.5):
                done = False
                break
        if done:
            return True
        time.sleep(0.05)
    return False


def actor_back(cluster: LocalCluster, target: str, old_pid: int, t_kill: float) -> float | None:
    """Kill → the new process answers a call that does not start the actor (so the
    measurement does not stand in for the supervisor's heartbeat or the ingress)."""
    method = "latencies" if target == "coordinator" else "clocks"
    try:
        cluster.call(target, method, timeout=60)
    except Exception as exc:
        log.warning("%s did not answer after the kill: %s", target, exc)
        return None
    return round(time.time() - t_kill, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stream = f"bench-recovery-{uuid.uuid4().hex[:8]}"
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        root = Path(tmp)
        cluster = start_cluster(root, stream, args.heartbeat)
        stream_load = StreamLoad(stream, args.rate, "r")
        hook_load = BackgroundLoad(
            f"{cluster.ingress_url}/v1/events/bench/hook", args.rate, "w", give_up_after=120
        )
        try:
            result = _measure(args, cluster, root, hook_load, stream_load, targets)
        finally:
            with_stop = [hook_load, stream_load]
            for load in with_stop:
                try:
                    load.stop()
                except Exception:
                    log.exception("stopping a load generator")
            cluster.stop(drain_timeout=10)
            stream_load.cleanup()
    return result


def _measure(
    args: argparse.Namespace,
    cluster: LocalCluster,
    root: Path,
    hook_load: BackgroundLoad,
    stream_load: StreamLoad,
    targets: list[str],
) -> dict[str, Any]:
    runlog = RunLog(root / "runs.jsonl")
    hook_load.start()
    stream_load.start()
    sent_count = {
        "hook": lambda: len(hook_load.requests),
        "stream": lambda: len(stream_load.sent),
    }
    time.sleep(args.warmup)
    t_b0 = time.time()
    time.sleep(args.baseline_seconds)
    t_b1 = time.time()
    rows = runlog.poll()
    base_rows = [r for r in rows if t_b0 <= r["sent"] <= t_b1]
    online_lag = {
        "hook": args.rate * max(0.05, _p99([r["started"] - r["sent"] for r in base_rows])),
        "stream": args.rate * max(0.05, _p99([r["started"] - r["sent"] for r in base_rows])),
    }
    kills: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for target in targets:
            actor = "coordinator" if target == "coordinator" else "host-0"
            flows = ["hook", "stream"] if target == "coordinator" else ["stream"]
            old_pid = int(cluster.call(actor, "ping")["pid"])
            t_kill = time.time()
            os.kill(old_pid, signal.SIGKILL)
            back = actor_back(cluster, actor, old_pid, t_kill)
            ok = wait_caught_up(runlog, flows, t_kill, sent_count, online_lag, args.recover_timeout)
            new_pid = int(cluster.call(actor, "ping", timeout=60)["pid"])
            log.info(
                "rep %d: %s killed (pid %d → %d), caught up: %s", rep, target, old_pid, new_pid, ok
            )
            kills.append(
                {
                    "repeat": rep,
                    "target": target,
                    "t_kill": t_kill,
                    "flows": flows,
                    "actor_back_s": back,
                    "pid_changed": new_pid != old_pid,
                    "caught_up_online": ok,
                }
            )
            time.sleep(args.gap)
    supervisor_view = cluster.call("supervisor", "actors")
    hook_result = hook_load.stop()
    stream_load.stop()
    expected = {
        "hook": {r.key for r in hook_result.requests if r.status in (200, 202)},
        "stream": {k for k, _ in stream_load.sent},
    }
    total = sum(len(v) for v in expected.values())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len({(r["flow"], r["key"]) for r in runlog.poll()}) >= total:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # a duplicate would show up late
    rows = runlog.poll()
    return analyse(
        args, rows, hook_result, stream_load, expected, kills, (t_b0, t_b1), supervisor_view
    )


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def analyse(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    hook: LoadResult,
    stream_load: StreamLoad,
    expected: dict[str, set[str]],
    kills: list[dict[str, Any]],
    baseline: tuple[float, float],
    supervisor_view: list[dict[str, Any]],
) -> dict[str, Any]:
    by_flow = {f: [r for r in rows if r["flow"] == f] for f in ("hook", "stream")}
    sent = {
        "hook": [r.sent for r in hook.requests if r.sent],
        "stream": [t for _, t in stream_load.sent],
    }
    series = {f: Series(sent[f], [r["started"] for r in by_flow[f]]) for f in by_flow}
    t_b0, t_b1 = baseline
    base_lag = {f: steady_lag(series[f], t_b0, t_b1) for f in series}
    result_kills = []
    for k in kills:
        t_kill = k["t_kill"]
        entry: dict[str, Any] = {
            "repeat": k["repeat"],
            "target": k["target"],
            "actor_back_s": k["actor_back_s"],
            "pid_changed": k["pid_changed"],
        }
        for flow in k["flows"]:
            entry[flow] = drain(series[flow], by_flow[flow], t_kill, base_lag[flow], args.gap + 60)
        if k["target"] == "coordinator":
            entry["kill_to_first_202_s"] = first_202_after(hook, t_kill)
            entry["ingress_answers_during_recovery"] = outage_answers(
                hook, t_kill, t_kill + (entry["hook"].get("caught_up_s_after_kill") or 5)
            )
        result_kills.append(entry)

    def over(target: str, *path: str) -> dict[str, Any]:
        values = []
        for e in result_kills:
            if e["target"] != target:
                continue
            v: Any = e
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            values.append(v)
        return p50_max(values)

    summary: dict[str, Any] = {}
    if any(k["target"] == "coordinator" for k in kills):
        summary["coordinator"] = {
            "actor_back_s": over("coordinator", "actor_back_s"),
            "kill_to_first_202_s": over("coordinator", "kill_to_first_202_s"),
            "kill_to_first_new_run_s_hook": over("coordinator", "hook", "kill_to_first_new_run_s"),
            "kill_to_first_new_run_s_stream": over(
                "coordinator", "stream", "kill_to_first_new_run_s"
            ),
            "backlog_events_hook": over("coordinator", "hook", "backlog_events"),
            "drain_rate_per_s_hook": over("coordinator", "hook", "drain_rate_per_s"),
            "drain_rate_per_s_stream": over("coordinator", "stream", "drain_rate_per_s"),
        }
    if any(k["target"] == "host" for k in kills):
        summary["host"] = {
            "actor_back_s": over("host", "actor_back_s"),
            "kill_to_first_new_run_s_stream": over("host", "stream", "kill_to_first_new_run_s"),
            "backlog_events_stream": over("host", "stream", "backlog_events"),
            "drain_rate_per_s_stream": over("host", "stream", "drain_rate_per_s"),
        }
    integrity = {}
    for flow, keys in expected.items():
        counts = Counter(r["key"] for r in by_flow[flow])
        integrity[flow] = {
            "events": len(keys),
            "runs": sum(counts.values()),
            "lost": len(keys - set(counts)),
            "duplicated": sum(1 for c in counts.values() if c > 1),
        }
    integrity["hook"]["never_accepted"] = len(hook.requests) - len(expected["hook"])
    baseline_rows = {f: [r for r in by_flow[f] if t_b0 <= r["sent"] <= t_b1] for f in by_flow}
    worst = [
        v["max"]
        for part in summary.values()
        for name, v in part.items()
        if name.startswith(("kill_to_first_new_run", "kill_to_first_202")) and v["max"] is not None
    ]
    return {
        "benchmark": "recovery",
        "rate_per_s_each_source": args.rate,
        "repeats": args.repeats,
        "heartbeat_seconds": args.heartbeat,
        "baseline_event_to_flow_start": {
            f: summary_ms([r["started"] - r["sent"] for r in rs]) for f, rs in baseline_rows.items()
        },
        "summary": summary,
        "kills": result_kills,
        "integrity": integrity,
        "load": hook.summary(args.rate),
        "supervisor_restarts": {a["name"]: a["restarts"] for a in supervisor_view},
        "target": {"recovery_s": TARGET_S},
        "worst_recovery_s": max(worst) if worst else None,
    }
