"""A running cluster from the driver's side: start, wait until listening, stop.

The driver (``listeners up`` in the foreground, the background process of ``up --detach``,
``listen()``, or a test) owns the Ray connection, the embedded Prefect server and the state
file ``<state_dir>/cluster.json`` through which the CLI reaches the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import ray

from actors.errors import ListenerError
from actors.ledger import check_shard_layout
from cluster.bootstrap import (
    Deployment,
    clock_states,
    deploy,
    kill_namespace_actors,
    namespace_for,
    start_deployment,
    stop_deployment,
)
from cluster.config import ClusterConfig

log = logging.getLogger(__name__)
STATE_FILE = "cluster.json"


def prefect_template_db() -> Path:
    """A migrated, empty Prefect database shared by fresh state dirs (saves ~3 s a start)."""
    import prefect

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "listener-cluster" / f"prefect-{prefect.__version__}.db"


class StartError(ListenerError):
    """The cluster could not start; nothing of it is left running."""


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    path = Path(state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_crashed_driver(state: dict[str, Any]) -> None:
    """A driver killed with -9 leaves Ray helper processes in its process group; when the
    driver led its own group (``up --detach``), kill what is left of that group."""
    pid, pgid = int(state.get("pid", 0)), int(state.get("pgid", -1))
    if pid and pgid == pid and not pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class LocalCluster:
    """One cluster driven from this process. Use as a context manager or call start/stop."""

    def __init__(self, config: ClusterConfig, flow_objs: dict[str, Any] | None = None) -> None:
        self.config = config
        self.flow_objs = flow_objs
        self.state_dir = config.state_path
        self.namespace = namespace_for(self.state_dir)
        self.admin_token = secrets.token_urlsafe(24)
        self.deployment: Deployment | None = None
        self.prefect: Any = None
        self.prefect_api_url: str | None = None
        self._started_ray = False
        self._loop = asyncio.new_event_loop()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        self._refuse_if_running()
        missing = self.config.missing_tokens()
        if missing:
            raise StartError(
                "tenant tokens are not set in the environment: "
                + ", ".join(missing)
                + " (a tenant with token_env accepts only authenticated requests)"
            )
        c = self.config
        check_shard_layout(c.ledger_url, c.state_path, c.cluster.coordinator_shards)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._write("starting")
        try:
            self._init_ray()
            tracking, env = self._start_prefect()
            kill_namespace_actors(self.namespace)  # leftovers of a driver killed with -9
            self.deployment = deploy(
                self.config,
                tracking=tracking,
                worker_env=env,
                admin_token=self.admin_token,
                flow_objs=self.flow_objs,
            )
            self._run(start_deployment(self.deployment), timeout)
            self.wait_listening(timeout)
        except BaseException as exc:
            reason = f"interrupted (exit {exc.code})" if isinstance(exc, SystemExit) else str(exc)
            self._write("failed", error=reason or type(exc).__name__)
            self.stop(drain_timeout=0)
            if isinstance(exc, (ListenerError, KeyboardInterrupt)):
                raise
            raise StartError(f"cluster did not start: {type(exc).__name__}: {exc}") from exc
        self._write("listening")
        return self

    def _refuse_if_running(self) -> None:
        state = read_state(self.state_dir)
        if not state or state.get("state") not in ("starting", "listening"):
            return
        pid = int(state.get("pid", 0))
        if pid != os.getpid() and pid_alive(pid):
            raise StartError(
                f"a cluster already runs from {self.state_dir} (pid {pid}); "
                "stop it with `listeners down`"
            )
        reap_crashed_driver(state)

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        address = self.config.cluster.ray_address
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # ``ray.init()`` alone would join whatever `ray start` cluster this machine last
            # ran (even a dead one); ``ray_address: null`` means a fresh local Ray. Inside a
            # Ray Job, RAY_ADDRESS names the job's cluster and is followed.
            address = "local"
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
        self._started_ray = True

    def _start_prefect(self) -> tuple[str, dict[str, str]]:
        mode = self.config.cluster.prefect
        if mode == "off":
            return "off", {}
        if mode == "embedded":
            from cluster.prefect_server import PrefectServer

            self.prefect = PrefectServer(self.state_dir, template_db=prefect_template_db())
            self.prefect.start()
            self.prefect_api_url = self.prefect.api_url
        else:
            self.prefect_api_url = mode
        return "api", {"PREFECT_API_URL": str(self.prefect_api_url)}

    def wait_listening(self, timeout: float) -> list[dict[str, Any]]:
        """Block until every clock listens; raise StartError naming the ones that do not."""
        assert self.deployment is not None
        deadline = time.monotonic() + timeout
        while True:
            states = self._run(clock_states(self.deployment), 30)
            waiting = [c for c in states if c["state"] != "listening"]
            if not waiting:
                return states
            if time.monotonic() > deadline or any(c["state"] == "failed" for c in waiting):
                reasons = "; ".join(
                    f"{c['tenant']}/{c['flow']}/{c['name']}: {c['state']}"
                    + (f" ({c['error']})" if c.get("error") else "")
                    for c in waiting
                )
                raise StartError(f"clocks not listening after {timeout:.0f}s: {reasons}")
            time.sleep(0.1)

    def stop(self, drain_timeout: float = 30.0) -> None:
        if self.deployment is not None:
            try:
                self._run(stop_deployment(self.deployment, drain_timeout), drain_timeout + 30)
            except Exception:
                # Kill the actors below regardless; say why the clean stop did not happen.
                log.exception("clean stop of the cluster's actors failed; killing them")
            self.deployment = None
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                kill_namespace_actors(self.namespace)
        if self.prefect is not None:
            self.prefect.stop()
            self.prefect = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        state = read_state(self.state_dir) or {}
        if state.get("pid") == os.getpid() and state.get("state") != "failed":
            self._write("stopped")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------
    @property
    def ingress_url(self) -> str:
        c = self.config.cluster.ingress
        port = self.deployment.ingress_port if self.deployment else c.port
        return f"http://{c.host}:{port}"

    def _run(self, coro: Any, timeout: float) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def call(self, actor: str, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call a method of one of the cluster's actors (tests and benchmarks)."""
        assert self.deployment is not None
        handles: dict[str, Any] = {h.name: h for h in self.deployment.all_handles()}
        handles["coordinator"] = self.deployment.coordinator  # all shards, routed and merged
        return self._run(handles[actor].call(method, *args), timeout)

    def _write(self, state: str, error: str | None = None) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_state(
            self.state_dir,
            {
                "state": state,
                "error": error,
                "pid": os.getpid(),
                "pgid": os.getpgid(0),
                "namespace": self.namespace,
                "config": self.config.source,
                "ingress_url": self.ingress_url,
                "admin_token": self.admin_token,
                "prefect_api_url": self.prefect_api_url,
                "prefect_ui_url": getattr(self.prefect, "ui_url", None),
                "updated": time.time(),
            },
        )
