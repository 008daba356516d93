"""One shared Ray for the whole session; a fresh cluster (own state dir, own names) per test."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.config import load_config
from cluster.runtime import LocalCluster

FLOWS = """
import json, os, time
from pathlib import Path
from prefect import flow
from actors.flow_runner import current_attempt

LOG = Path({log!r})


def _record(name, event):
    line = json.dumps({{"flow": name, "event": event, "attempt": current_attempt(),
                       "pid": os.getpid(), "at": time.time()}})
    with open(LOG, "a") as fh:
        fh.write(line + "\\n")


@flow
def ingest(event: dict | None = None):
    _record("ingest", event)
    return "ok"


@flow
def other(event: dict | None = None):
    _record("other", event)
    return "ok"


@flow
def slow(event: dict | None = None):
    time.sleep(float((event or {{}}).get("payload", {{}}).get("sleep", 0.5)))
    _record("slow", event)


@flow
def unserialisable(event: dict | None = None):
    _record("unserialisable", event)
    import threading
    return threading.Lock()


@flow
def flaky(event: dict | None = None):
    _record("flaky", event)
    if current_attempt() < int((event or {{}}).get("payload", {{}}).get("succeed_on", 99)):
        raise RuntimeError("flaky failure on attempt %s" % current_attempt())
"""


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class ClusterUnderTest:
    """A running cluster plus what a test needs to poke at it."""

    def __init__(self, root: Path, cluster: LocalCluster) -> None:
        self.root = root
        self.cluster = cluster
        state = json.loads((cluster.state_dir / "cluster.json").read_text())
        self.url = state["ingress_url"]
        self.admin = {"Authorization": f"Bearer {state['admin_token']}"}

    def post(self, flow: str, body: Any, tenant: str = "default", **kw: Any) -> httpx.Response:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        return httpx.post(f"{self.url}/v1/events/{tenant}/{flow}", timeout=30, **kwargs, **kw)

    def post_retrying(self, flow: str, body: Any, timeout: float = 60.0) -> httpx.Response:
        """POST as a well-behaved webhook sender: retry on 503/transport errors."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.post(flow, body)
                if r.status_code != 503:
                    return r
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ingress kept failing for {body}")
            time.sleep(0.1)

    def control(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, self.url + path, headers=self.admin, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def status(self, flow: str = "ingest") -> dict[str, Any]:
        flows = self.control("GET", "/v1/status")["flows"]
        return next(f for f in flows if f["flow"] == flow)

    def runs(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        return self.control("GET", "/v1/runs", params=params)["runs"]

    def log(self, flow: str | None = None) -> list[dict[str, Any]]:
        path = self.root / "ran.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if flow is None or r["flow"] == flow]

    def executions(self, flow: str = "ingest") -> Counter[str]:
        return Counter(r["event"]["id"] for r in self.log(flow))

    def completed(self, flow: str = "ingest") -> int:
        return self.status(flow)["runs"]["completed"]


@pytest.fixture
def make_cluster(ray_session: None, tmp_path: Path) -> Iterator[Callable[..., ClusterUnderTest]]:
    started: list[LocalCluster] = []

    def make(
        flows: list[dict[str, Any]], check_entrypoints: bool = True, **cluster_opts: Any
    ) -> ClusterUnderTest:
        (tmp_path / "flows.py").write_text(
            textwrap.dedent(FLOWS.format(log=str(tmp_path / "ran.jsonl")))
        )
        opts = {"prefect": "off", "ingress": {"port": 0}, "heartbeat_seconds": 0.5}
        opts.update(cluster_opts)
        for f in flows:
            f.setdefault("entrypoint", f"flows.py:{f['name']}")
        (tmp_path / "listeners.yaml").write_text(yaml.safe_dump({"cluster": opts, "flows": flows}))
        config = load_config(tmp_path / "listeners.yaml", check_entrypoints=check_entrypoints)
        cluster = LocalCluster(config).start(timeout=120)
        started.append(cluster)
        return ClusterUnderTest(tmp_path, cluster)

    yield make
    for cluster in started:
        cluster.stop(drain_timeout=5)


@pytest.fixture
def ci() -> bool:
    return bool(os.environ.get("CI"))
