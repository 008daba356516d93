"""ingress-server: the webhook path served by our ingress actor vs by Ray Serve, same run.

    python scripts/bench.py ingress-server [--rate 100] [--seconds 10] [--concurrency 16]
        [--load-seconds 5] [--fault-seconds 6] [--dashboard] [--order ours,serve]

One local Ray (``ray.init(address="local", num_cpus=2)``), one sink actor standing in for the
coordinator (an async actor whose ``submit(bytes) -> str`` appends to a list; restartable), and
the same Starlette app (``POST /v1/events/{tenant}/{flow}`` → ``await sink.submit`` → 202, 503
with Retry-After when the sink is unreachable) served two ways:

(a) ours: an async Ray actor running uvicorn on its own event loop (``actors.ingress`` design,
    the same ``_QuietServer``), bound to a free loopback port;
(b) Ray Serve: a ``@serve.deployment`` wrapping the same app with ``@serve.ingress``, one
    replica, served by Serve's HTTP proxy on a free loopback port
    (``serve.start(http_options={"host": "127.0.0.1", "port": <free>})``).

Measured for each: startup (deploy → first 202), the server's processes and their RSS/PSS
(descendants of this Ray's raylet, by process title), client → 202 latency at a steady rate
(sequential ``httpx.Client``, keep-alive), max sustained 202/s with N concurrent clients
(``httpx.AsyncClient``), and the answers seen while the sink actor is killed and restarted by
Ray (``ray.kill(sink, no_restart=False)``). ``ratios`` are serve / ours.

Needs ``ray[serve]`` (Serve's gRPC reflection and proxy dependencies); without it the Serve
column reports the exact ``pip install``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HELP = "webhook server: ingress actor (uvicorn+Starlette) vs Ray Serve, same run"
NAMESPACE = "ingress-server-bench"
SINK_NAME = "bench-sink"
SUBMIT_TIMEOUT = 5.0  # as cluster.bootstrap.INGRESS_SUBMIT_TIMEOUT
PATH = "/v1/events/bench/probe"
SERVE_PREFIXES = ("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica")
OURS_PREFIXES = ("ray::IngressServer",)


# -- the shared app ---------------------------------------------------------------------------
def build_app(sink: Any) -> Starlette:
    """The minimal webhook path: body → ``sink.submit`` → 202 (503 when the sink is down)."""
    import ray.exceptions

    async def post_event(request: Request) -> Response:
        body = await request.body()
        try:
            event_id = await asyncio.wait_for(_await(sink.submit.remote(body)), SUBMIT_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return JSONResponse(
                {"error": f"sink unavailable, retry: {type(exc).__name__}"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        return JSONResponse({"id": event_id, "status": "accepted"}, status_code=202)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "pid": os.getpid()})

    return Starlette(
        routes=[
            Route("/v1/health", health, methods=["GET"]),
            Route("/v1/events/{tenant}/{flow}", post_event, methods=["POST"]),
        ]
    )


async def _await(ref: Any) -> Any:
    return await ref


def lookup_sink() -> Any:
    import ray

    return ray.get_actor(SINK_NAME, namespace=NAMESPACE)


# -- actors (classes built lazily so importing this module needs no Ray) -----------------------
def make_sink_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
    class Sink:
        def __init__(self) -> None:
            self.events: list[bytes] = []

        async def submit(self, body: bytes) -> str:
            self.events.append(body)
            return hashlib.sha256(body).hexdigest()[:16]

        async def count(self) -> int:
            return len(self.events)

        async def pid(self) -> int:
            return os.getpid()

    return Sink


def make_ingress_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class IngressServer:
        """Our design: uvicorn on the actor's own loop (as ``actors.ingress.Ingress.start``)."""

        def __init__(self, host: str, http: str) -> None:
            self.host, self.http = host, http
            self.port = 0
            self._server: Any = None
            self._task: asyncio.Task[None] | None = None

        async def start(self) -> dict[str, Any]:
            import uvicorn

            from actors.ingress import _QuietServer

            config = uvicorn.Config(
                build_app(lookup_sink()),
                host=self.host,
                port=0,
                http=self.http,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
            server = _QuietServer(config)
            self._server = server
            self._task = asyncio.create_task(server.serve())
            while not server.started:
                if self._task.done():
                    raise OSError(f"could not bind {self.host}: {self._task.exception()}")
                await asyncio.sleep(0.01)
            self.port = server.servers[0].sockets[0].getsockname()[1]
            http = getattr(config, "http_protocol_class", None)
            return {"port": self.port, "pid": os.getpid(), "http": getattr(http, "__name__", "?")}

        async def stop(self) -> None:
            if self._server is not None:
                self._server.should_exit = True
                if self._task is not None:
                    await asyncio.gather(self._task, return_exceptions=True)
                self._server = None

    return IngressServer


def make_serve_app(max_ongoing_requests: int) -> Any:
    from ray import serve

    @serve.ingress()
    class ServeWebhook:
        def __serve_build_asgi_app__(self) -> Starlette:
            return build_app(lookup_sink())

    deployment = serve.deployment(
        ServeWebhook,
        name="webhook",
        num_replicas=1,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return deployment.bind()


# -- measurement helpers -----------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p95_ms": round(pct(ms, 95), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
    }


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (ppid, title) for every process readable in /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            table[int(entry.name)] = (ppid, title)
    return table


def _memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def ray_processes(raylet: int) -> dict[int, str]:
    """Descendants of this Ray's raylet (its workers: actors and idle ones), pid → title."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(raylet, []))
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def process_cost(raylet: int, before: dict[int, str], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The server's processes (by title) plus any other new non-idle ones, with memory."""
    now = ray_processes(raylet)
    mine = {p: t for p, t in now.items() if t.startswith(prefixes)}
    other_new = {
        p: t
        for p, t in now.items()
        if p not in before and p not in mine and not t.startswith("ray::IDLE")
    }
    rows = []
    for pid, title in sorted({**mine, **other_new}.items()):
        rss, pss = _memory_kb(pid)
        rows.append(
            {
                "pid": pid,
                "title": title[:60],
                "rss_mb": round(rss / 1024, 1),
                "pss_mb": round(pss / 1024, 1),
            }
        )
    return {
        "count": len(rows),
        "rss_mb": round(sum(r["rss_mb"] for r in rows), 1),
        "pss_mb": round(sum(r["pss_mb"] for r in rows), 1),
        "processes": rows,
    }


def wait_first_202(url: str, timeout: float) -> float:
    """Poll until the webhook answers 202; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                r = client.post(url, content=b'{"warm": true}')
                if r.status_code == 202:
                    return time.monotonic()
                last = f"{r.status_code} {r.text[:80]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.01)
    raise RuntimeError(f"no 202 from {url} within {timeout}s (last: {last})")


def steady_latency(url: str, rate: float, seconds: float) -> dict[str, Any]:
    n, interval = int(rate * seconds), 1.0 / rate
    times: list[float] = []
    bad = 0
    with httpx.Client(timeout=10) as client:
        for i in range(100):  # warm the connection and both processes
            client.post(url, content=b'{"id": "warm-%d"}' % i)
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t = time.perf_counter()
            r = client.post(url, content=b'{"id": "lat-%d"}' % i)
            times.append(time.perf_counter() - t)
            bad += r.status_code != 202
    return {"rate_per_s": rate, "non_202": bad, **latency_ms(times)}


async def _load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: dict[str, int] = {}
    times: list[float] = []
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def one(worker: int, stop_at: float, record: bool) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=b'{"w": %d, "i": %d}' % (worker, i))
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                if record:
                    statuses[key] = statuses.get(key, 0) + 1
                    if key == "202":
                        times.append(time.perf_counter() - t)
                i += 1

        warm_until = time.perf_counter() + 1.0
        await asyncio.gather(*(one(w, warm_until, False) for w in range(concurrency)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(one(w, stop_at, True) for w in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "accepted_per_s": round(statuses.get("202", 0) / wall, 1),
        "statuses": statuses,
        "latency_under_load": latency_ms(times),
        "client_cpu_share": round(cpu / wall, 2),  # near 1.0: the client is the bottleneck
    }


def throughput(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    return asyncio.run(_load(url, concurrency, seconds))


def sink_fault(url: str, sink: Any, rate: float, seconds: float) -> dict[str, Any]:
    """Steady requests while the sink actor is killed (Ray restarts it): what clients see."""
    import ray

    rows: list[tuple[float, str, float]] = []  # (sent, status, latency)

    def sender() -> None:
        interval = 1.0 / rate
        with httpx.Client(timeout=15) as client:
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < seconds:
                delay = t0 + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                t = time.monotonic()
                try:
                    key = str(client.post(url, content=b'{"fault": %d}' % i).status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                rows.append((t, key, time.monotonic() - t))
                i += 1

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    time.sleep(seconds / 4)
    killed_at = time.monotonic()
    ray.kill(sink, no_restart=False)
    thread.join(seconds + 30)
    statuses: dict[str, int] = {}
    for _, key, _ in rows:
        statuses[key] = statuses.get(key, 0) + 1
    failed = [t for t, key, _ in rows if key != "202"]
    recovered = [t + lat for t, key, lat in rows if key == "202" and t > max(failed, default=0)]
    after_kill = [lat for t, _, lat in rows if t >= killed_at]
    with httpx.Client(timeout=10) as client:
        alive = client.post(url, content=b'{"after": true}').status_code == 202
    return {
        "requests": len(rows),
        "statuses": statuses,
        "errors": len(failed),
        "first_202_after_kill_s": round(
            min((t + lat for t, k, lat in rows if k == "202" and t >= killed_at), default=0.0)
            - killed_at,
            3,
        ),
        "outage_s": round(min(recovered) - killed_at, 3) if failed and recovered else 0.0,
        "max_latency_after_kill_ms": round(max(after_kill, default=0.0) * 1000, 1),
        "server_answers_202_after": alive,
    }


# -- the two columns ---------------------------------------------------------------------------
def measure(
    url: str, args: argparse.Namespace, sink: Any, cost: dict[str, Any], startup: dict[str, Any]
) -> dict[str, Any]:
    return {
        "startup": startup,
        "processes": cost,
        "steady": steady_latency(url, args.rate, args.seconds),
        "throughput": throughput(url, args.concurrency, args.load_seconds),
        "sink_restart": sink_fault(url, sink, args.rate, args.fault_seconds),
    }


def run_ours(args: argparse.Namespace, sink: Any, raylet: int) -> dict[str, Any]:
    import ray

    before = ray_processes(raylet)
    t0 = time.monotonic()
    server = (
        make_ingress_class()
        .options(name="bench-ingress", namespace=NAMESPACE)
        .remote("127.0.0.1", args.ours_http)
    )
    try:
        info = ray.get(server.start.remote(), timeout=120)
        started = time.monotonic()
        url = f"http://127.0.0.1:{info['port']}{PATH}"
        first = wait_first_202(url, 60)
        startup = {
            "deploy_to_listening_s": round(started - t0, 3),
            "deploy_to_first_202_s": round(first - t0, 3),
            "http_protocol": info["http"],
        }
        cost = process_cost(raylet, before, OURS_PREFIXES)
        return measure(url, args, sink, cost, startup)
    finally:
        with contextlib.suppress(Exception):
            ray.get(server.stop.remote(), timeout=10)
        ray.kill(server)


def run_serve(args: argparse.Namespace, sink: Any, raylet: int) -> dict[str, Any]:
    try:
        from ray import serve
    except ImportError as exc:
        return {"error": f"{exc}; pip install 'ray[serve]=={_ray_version()}'"}
    before = ray_processes(raylet)
    port = free_port()
    t0 = time.monotonic()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t_start = time.monotonic()
        serve.run(
            make_serve_app(args.max_ongoing_requests),
            name="webhook",
            route_prefix="/",
            blocking=False,
        )
        t_run = time.monotonic()
        url = f"http://127.0.0.1:{port}{PATH}"
        first = wait_first_202(url, 120)
        startup = {
            "serve_start_s": round(t_start - t0, 3),
            "deploy_to_run_returned_s": round(t_run - t0, 3),
            "deploy_to_first_202_s": round(first - t0, 3),
            "max_ongoing_requests": args.max_ongoing_requests,
        }
        cost = process_cost(raylet, before, SERVE_PREFIXES)
        return measure(url, args, sink, cost, startup)
    finally:
        serve.shutdown()


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


RATIO_KEYS = {
    "startup_first_202_s": ("startup", "deploy_to_first_202_s"),
    "steady_p50_ms": ("steady", "p50_ms"),
    "steady_p95_ms": ("steady", "p95_ms"),
    "steady_p99_ms": ("steady", "p99_ms"),
    "accepted_per_s": ("throughput", "accepted_per_s"),
    "load_p50_ms": ("throughput", "latency_under_load", "p50_ms"),
    "processes": ("processes", "count"),
    "rss_mb": ("processes", "rss_mb"),
    "pss_mb": ("processes", "pss_mb"),
    "sink_restart_errors": ("sink_restart", "errors"),
}


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key, {}) if isinstance(doc, dict) else {}
    return doc if isinstance(doc, int | float) else None


def ratios(ours: dict[str, Any], serve: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, path in RATIO_KEYS.items():
        a, b = _dig(ours, path), _dig(serve, path)
        out[name] = round(b / a, 2) if a and b is not None else None
    return out


# -- entry points ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=100.0, help="steady requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady phase length")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--fault-seconds", type=float, default=6.0)
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=100,
        help="Serve replica limit (Serve's default of 5 would queue 16 clients at the proxy)",
    )
    parser.add_argument(
        "--ours-http",
        default="auto",
        choices=["auto", "h11", "httptools"],
        help="uvicorn's HTTP parser in our ingress (auto: httptools when installed)",
    )
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    parser.add_argument("--order", default="ours,serve", help="which server is measured first")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import ray.cloudpickle

    # The actor and deployment classes live in this script module, which Ray's workers cannot
    # import: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray and Serve print status lines on stdout (e.g. "(raylet) Task
    # ServeController.graceful_shutdown failed" on serve.shutdown); stdout is for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        columns, stored = _run_columns(args)
    ours, serve = columns.get("ours", {}), columns.get("serve", {})
    return {
        "benchmark": "ingress-server",
        "ray": _ray_version(),
        "cpus": os.cpu_count(),
        "ray_num_cpus": 2,
        "dashboard": args.dashboard,
        "order": args.order,
        "sink_events_since_last_restart": stored,
        "ours": ours,
        "serve": serve,
        "ratios_serve_over_ours": ratios(ours, serve),
    }


def _run_columns(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=args.dashboard,
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        sink = make_sink_class().options(name=SINK_NAME, namespace=NAMESPACE).remote()
        sink_pid = ray.get(sink.pid.remote(), timeout=60)
        raylet = _proc_table()[sink_pid][0]
        columns: dict[str, Any] = {}
        for which in args.order.split(","):
            runner = run_ours if which == "ours" else run_serve
            columns[which] = runner(args, sink, raylet)
        stored = ray.get(sink.count.remote(), timeout=30)
    finally:
        ray.shutdown()
    return columns, stored
