"""peer-prefect: the same events through Prefect's own trigger path and through the cluster.

    python scripts/bench.py peer-prefect [--prefect-events 20] [--prefect-interval 2]
        [--ours-events 300] [--ours-rate 100] [--tracked-events 50] [--tracked-rate 5]

One run, one machine, one embedded Prefect server (``cluster.prefect_server.PrefectServer``,
with the services a deployment trigger needs forced on: ``triggers``, which also gates the
``actions`` service that runs the deployment, and the event persister):

(a) Prefect: the ``latency`` benchmark's probe flow, served in a subprocess with
    ``probe.serve(triggers=[DeploymentEventTrigger(expect={"bench.event"}, parameters=...)])``
    whose runner polls every second (``PREFECT_RUNNER_POLL_FREQUENCY=1``: the setting is an
    integer number of seconds, 1 is its best value). The trigger passes the whole event payload
    into the flow's ``event`` parameter (``json`` of the ``jinja`` template
    ``{{ event.payload | tojson }}``, the form 3.9's hydration renders for a dict). Events are
    sent one every ``--prefect-interval`` seconds with ``prefect.events.emit_event``.
(b) ours: a LocalCluster with ``prefect: off``, the same flow, events POSTed to the ingress at
    ``--ours-rate``; (c) the same, tracked against the same Prefect server (skip with
    ``--tracked-events 0``).

Latency is the flow body's first ``time.time()`` minus the sender's ``time.time()`` taken right
before the send; the headline is ``ratio_p50 = prefect p50 / ours (untracked) p50``.
Prefect runs first, alone on the machine (no Ray yet); the server stays up, idle, for (b) and
(c). Everything started here (server, runner and its flow-run processes, clusters, Ray if this
process started it) is stopped on the way out, also on errors and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from benchmarks.common import PROBE_FLOW, send_steady, start_cluster, summary_ms, wait_lines
from cluster.prefect_server import PrefectServer, tail
from cluster.runtime import prefect_template_db

HELP = "Prefect's own event triggers vs the cluster, same flow, same run"
EVENT_NAME = "bench.event"
DEPLOYMENT = "peer-prefect"
FLOW_NAME = "probe"
RESOURCE_PREFIX = "bench.peer."
TARGET_RATIO_P50 = 1000

# Settings the server needs for a deployment trigger to fire (all default on in 3.9.1; forced
# on here so a caller's environment cannot silently turn the peer off).
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",  # also gates the actions service
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "true",
}

SERVE_SCRIPT = '''"""Serve the probe flow with a deployment event trigger (peer-prefect benchmark).

argv: deployment name, event name, resource id pattern, runner process limit.
"""
import sys

from prefect.events import DeploymentEventTrigger

from bench_flows import probe

# The event's whole payload as the flow's `event` parameter, kept a dict.
EVENT_PARAMETER = {
    "__prefect_kind": "json",
    "value": {"__prefect_kind": "jinja", "template": "{{ event.payload | tojson }}"},
}

if __name__ == "__main__":
    deployment, event, resource, limit = sys.argv[1:5]
    probe.serve(
        name=deployment,
        triggers=[
            DeploymentEventTrigger(
                name=deployment,
                expect={event},
                match={"prefect.resource.id": resource},
                parameters={"event": EVENT_PARAMETER},
            )
        ],
        limit=int(limit),
        print_starting_message=False,
    )
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefect-events", type=int, default=20)
    parser.add_argument(
        "--prefect-interval", type=float, default=2.0, help="seconds between Prefect events"
    )
    parser.add_argument(
        "--poll-seconds", type=int, default=1, help="PREFECT_RUNNER_POLL_FREQUENCY (integer)"
    )
    parser.add_argument(
        "--prefect-timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the first (warm-up) and for the last Prefect run",
    )
    parser.add_argument("--ours-events", type=int, default=300)
    parser.add_argument("--ours-rate", type=float, default=100.0)
    parser.add_argument(
        "--tracked-events", type=int, default=50, help="0 skips the tracked cluster"
    )
    parser.add_argument("--tracked-rate", type=float, default=5.0)


# -- process plumbing -------------------------------------------------------------------------
@contextlib.contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (the server subprocess inherits them)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the cleanup below runs when the benchmark is killed."""
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
def shared_ray() -> Iterator[None]:
    """One Ray for both clusters (saves a ~5 s init); shut down only if started here.

    ``address="local"``: a bare ``ray.init()`` joins the latest ``ray start`` cluster recorded
    in /tmp/ray/ray_current_cluster, which on a shared machine may be someone else's (or dead:
    ``ray.init`` then retries forever)."""
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


def descendants(pid: int) -> list[int]:
    """Pids of all descendants of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class ServedFlow:
    """``probe.serve(triggers=[...])`` in its own process group; flow runs are its children
    (Prefect starts each in a new session, so ``stop`` also kills those by pid)."""

    def __init__(self, root: Path, api_url: str, poll_seconds: int, limit: int = 5) -> None:
        self.root = root
        self.api_url = api_url
        self.poll_seconds = poll_seconds
        self.limit = limit
        self.log_path = root / "runner.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.root / "prefect-home"),
            PREFECT_RUNNER_POLL_FREQUENCY=str(self.poll_seconds),
            PREFECT_SERVER_EPHEMERAL_ENABLED="false",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        script = self.root / "serve_probe.py"
        script.write_text(SERVE_SCRIPT)
        cmd = [sys.executable, str(script), DEPLOYMENT, EVENT_NAME, f"{RESOURCE_PREFIX}*"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*cmd, str(self.limit)],
                cwd=self.root,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = self._proc.poll() if self._proc else None
            raise RuntimeError(
                f"the served flow's runner exited (code {code}); {self.log_path}:\n"
                + tail(self.log_path)
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        kids = descendants(proc.pid)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in kids:  # flow-run processes live in sessions of their own
            with contextlib.suppress(OSError):
                if b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a reused pid
                    os.kill(pid, signal.SIGKILL)


# -- Prefect API --------------------------------------------------------------------------------
def wait_deployment(api: httpx.Client, served: ServedFlow, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served.check_alive()
        r = api.get(f"/deployments/name/{FLOW_NAME}/{DEPLOYMENT}")
        if r.status_code == 200:
            return str(r.json()["id"])
        time.sleep(0.2)
    raise RuntimeError(f"the served deployment did not appear within {timeout:.0f}s")


def automations_for(api: httpx.Client, deployment_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/automations/related-to/prefect.deployment.{deployment_id}")
    r.raise_for_status()
    return list(r.json())


def flow_runs(api: httpx.Client, deployment_id: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200}
    r = api.post("/flow_runs/filter", json=body)
    r.raise_for_status()
    return list(r.json())


def iso(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value).timestamp() if value else None


def breakdown(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where Prefect's time goes: event → run created (triggers + actions services),
    created → Running (runner poll, process start, engine), Running → flow body."""
    started = {r["id"]: r["started"] for r in rows}
    parts: dict[str, list[float]] = {"event_to_run_created": [], "created_to_running": []}
    parts["running_to_flow_body"] = []
    for run in runs:
        event = (run.get("parameters") or {}).get("event") or {}
        created, running = iso(run.get("created")), iso(run.get("start_time"))
        if event.get("id") not in started or created is None or running is None:
            continue
        parts["event_to_run_created"].append(created - event["payload"]["sent"])
        parts["created_to_running"].append(running - created)
        parts["running_to_flow_body"].append(started[event["id"]] - running)
    return {k: summary_ms(v) for k, v in parts.items()}


@contextlib.contextmanager
def prefect_emitter(api_url: str) -> Iterator[Callable[[str], float]]:
    """``emit(event_id) -> sent``: one ``emit_event`` to ``api_url``, ``sent`` (the sender's
    ``time.time()`` right before the send) in its payload."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):

        def emit(event_id: str) -> float:
            sent = time.time()
            emitted = emit_event(
                event=EVENT_NAME,
                resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{event_id}"},
                payload={"id": event_id, "payload": {"sent": sent}},
            )
            if emitted is None:
                raise RuntimeError(f"emit_event did not emit to {api_url}")
            return sent

        try:
            yield emit
        finally:
            EventsWorker.drain_all(timeout=10)


def read_rows(log: Path, prefix: str) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [row for row in map(json.loads, lines) if row["id"].startswith(prefix)]


def censored_summary(
    rows: list[dict[str, Any]], sent: dict[str, float], given_up: float
) -> dict[str, Any]:
    """Latency percentiles over every event sent. An event whose run had not started when we
    stopped waiting counts as ``given_up - sent``, so the figures become lower bounds."""
    started = {r["id"]: r["started"] for r in rows}
    summary: dict[str, Any] = summary_ms(
        [started[i] - t if i in started else given_up - t for i, t in sent.items()]
    )
    summary["lower_bound"] = len(started) < len(sent)
    return summary


def wait_rows(
    log: Path, prefix: str, n: int, timeout: float, served: ServedFlow
) -> list[dict[str, Any]]:
    """The rows of runs whose event id starts with ``prefix``, once ``n`` or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        rows = read_rows(log, prefix)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        served.check_alive()
        time.sleep(0.1)


def warm_up(emit: Callable[[str], float], log: Path, served: ServedFlow, timeout: float) -> float:
    """Emit a warm-up event every 15 s until one starts a run; seconds from the first emit."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < timeout:
        emit(f"warm-{i}")
        i += 1
        if wait_rows(log, "warm-", 1, min(15.0, timeout - (time.monotonic() - t0)), served):
            return time.monotonic() - t0
    raise RuntimeError(f"no flow run started within {timeout:.0f}s of {i} warm-up event(s)")


def diagnose(api: httpx.Client, deployment_id: str, served: ServedFlow, server: Path) -> str:
    with contextlib.suppress(Exception):
        autos = [
            (a.get("name"), a.get("enabled"), a.get("trigger", {}).get("expect"))
            for a in automations_for(api, deployment_id)
        ]
        runs = [(r["name"], r.get("state_type")) for r in flow_runs(api, deployment_id)]
        return (
            f"automations related to the deployment: {autos}; flow runs: {runs}\n"
            f"runner log tail:\n{tail(served.log_path, 20)}\n"
            f"server log tail:\n{tail(server, 20)}"
        )
    return "(diagnosis failed)"


def prefect_phase(root: Path, server: PrefectServer, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir(parents=True)
    log = root / "probe.jsonl"
    (root / "bench_flows.py").write_text(PROBE_FLOW.format(log=str(log)))
    served = ServedFlow(root, server.api_url, args.poll_seconds)
    n = args.prefect_events
    with contextlib.ExitStack() as stack:
        stack.callback(served.stop)
        api = stack.enter_context(httpx.Client(base_url=server.api_url, timeout=30))
        t0 = time.monotonic()
        served.start()
        deployment_id = wait_deployment(api, served, args.prefect_timeout)
        serve_s = time.monotonic() - t0
        emit = stack.enter_context(prefect_emitter(server.api_url))
        try:
            warm_s = warm_up(emit, log, served, args.prefect_timeout)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}\n{diagnose(api, deployment_id, served, server.log_path)}"
            ) from None
        t_first = time.monotonic()
        sent: dict[str, float] = {}
        for i in range(n):
            delay = t_first + i * args.prefect_interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[f"m-{i}"] = emit(f"m-{i}")
        rows = wait_rows(log, "m-", n, args.prefect_timeout, served)
        given_up = time.time()
        if not rows:
            raise RuntimeError(
                f"none of {n} events started a run within {args.prefect_timeout:.0f}s\n"
                + diagnose(api, deployment_id, served, server.log_path)
            )
        runs = flow_runs(api, deployment_id)
        automations = automations_for(api, deployment_id)
    import prefect

    return {
        "mechanism": (
            "flow.serve(triggers=[DeploymentEventTrigger(expect={'bench.event'})]) "
            "+ prefect.events.emit_event"
        ),
        "prefect_version": prefect.__version__,
        "runner_poll_seconds": args.poll_seconds,
        "automations": len(automations),
        "events": n,
        "interval_s": args.prefect_interval,
        "runs_started": len(rows),
        "missing": n - len(rows),
        "event_to_flow_start": censored_summary(rows, sent, given_up),
        "breakdown": breakdown(runs, rows),
        "serve_to_deployment_s": round(serve_s, 2),
        "warm_up_first_run_s": round(warm_s, 2),
    }


def ours_phase(root: Path, prefect: str, rate: float, n: int) -> dict[str, Any]:
    root.mkdir(parents=True)
    log = root / "probe.jsonl"
    t0 = time.monotonic()
    cluster = start_cluster(root, prefect)
    start_s = time.monotonic() - t0
    try:
        url = f"{cluster.ingress_url}/v1/events/bench/probe"
        with httpx.Client(timeout=30) as client:
            send_steady(client, url, rate=min(rate, 20.0), n=20, tag="warm")
            wait_lines(log, 20, 120)
            log.unlink()
            send_steady(client, url, rate=rate, n=n, tag="m")
        rows = wait_lines(log, n, 300)
    finally:
        cluster.stop(drain_timeout=10)
    return {
        "prefect": "off" if prefect == "off" else "tracked (same Prefect server)",
        "events": n,
        "rate_per_s": rate,
        "runs_started": len(rows),
        "event_to_flow_start": summary_ms([r["started"] - r["sent"] for r in rows]),
        "cluster_start_s": round(start_s, 2),
    }


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return round(a["event_to_flow_start"][key] / b["event_to_flow_start"][key], 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_raises())
        tmp = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench-peer-", ignore_cleanup_errors=True)
            )
        )
        server = PrefectServer(tmp / "prefect-server", ui=False, template_db=prefect_template_db())
        stack.callback(server.stop)
        with environ(SERVER_SETTINGS):
            server.start()
        peer = prefect_phase(tmp / "prefect", server, args)
        peer["server_start_s"] = round(server.startup_seconds or 0.0, 2)
        stack.enter_context(shared_ray())
        ours = {"untracked": ours_phase(tmp / "ours", "off", args.ours_rate, args.ours_events)}
        if args.tracked_events > 0:
            ours["tracked"] = ours_phase(
                tmp / "tracked", server.api_url, args.tracked_rate, args.tracked_events
            )
    doc: dict[str, Any] = {
        "benchmark": "peer-prefect",
        "prefect": peer,
        "ours": ours,
        "ratio_p50": ratio(peer, ours["untracked"], "p50_ms"),
        "ratio_p99": ratio(peer, ours["untracked"], "p99_ms"),
    }
    if "tracked" in ours:
        doc["ratio_p50_tracked"] = ratio(peer, ours["tracked"], "p50_ms")
    doc["target"] = {"ratio_p50_min": TARGET_RATIO_P50}
    doc["target_met"] = doc["ratio_p50"] >= TARGET_RATIO_P50
    doc["wall_seconds"] = round(time.monotonic() - t0, 1)
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    return doc
