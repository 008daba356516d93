"""``listeners submit``: the cluster as a Ray Job on an existing Ray cluster (`ray start`)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# Ports for the second head come from below the kernel's ephemeral range (32768+), which
# outgoing connections and bind-to-0 draw from, and above Ray's worker ports (10002-19999): a
# port picked there and released cannot be taken by someone's connection before `ray start`
# binds it (CI once lost the GCS port exactly that way).
HEAD_PORTS = range(20000, 32000)


def spare_ports(count: int) -> list[int]:
    picked: list[int] = []
    while len(picked) < count:
        port = random.choice(HEAD_PORTS)
        if port in picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
    return picked


def start_head(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, dashboard, agent, agent_grpc, runtime_env, metrics = spare_ports(6)
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                # Every port explicit: the test session's own Ray already holds the defaults
                # (the dashboard agent's 52365 ...), and the head's job agent would never come
                # up ("No available agent to submit job").
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--metrics-export-port={metrics}",
                "--dashboard-host=127.0.0.1",
                "--num-cpus=2",
                "--block",
                "--disable-usage-stats",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"

    def dashboard_up() -> bool:
        try:
            return httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401)
        except httpx.HTTPError:
            return head.poll() is not None  # ends the wait; checked by the caller

    wait_until(dashboard_up, timeout=120, what="the Ray head's dashboard")
    return head, address


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A separate Ray cluster started with ``ray start --head`` (in its own process group,
    stopped by signalling that group: never ``ray stop``, which kills every Ray here). A head
    that dies while starting (a port taken in the meantime) is started again on other ports."""
    logs = tmp_path_factory.mktemp("head")
    for attempt in range(3):
        log = logs / f"head{attempt}.log"
        head, address = start_head(log)
        if head.poll() is None:
            break
    assert head.poll() is None, log.read_text()[-2000:]
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(5)
    except subprocess.TimeoutExpired:  # `ray start --block` can take 30 s over its children
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)


def test_submit_runs_the_cluster_as_a_ray_job_until_the_job_is_stopped(
    ray_head: str, tmp_path: Path
):
    (tmp_path / "flows.py").write_text(
        "from prefect import flow\n\n@flow\ndef ingest(event=None):\n    return 1\n"
    )
    config = {
        "cluster": {"state_dir": str(tmp_path / "state"), "prefect": "off", "ingress": {"port": 0}},
        "flows": [
            {"name": "ingest", "entrypoint": "flows.py:ingest", "clocks": [{"type": "webhook"}]}
        ],
    }
    (tmp_path / "listeners.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "LISTENERS_CONFIG": str(tmp_path / "listeners.yaml")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cluster.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    sub = cli("submit", "listeners.yaml", "--address", ray_head, "--timeout", "180")
    assert sub.returncode == 0, sub.stderr
    assert "Ray job" in sub.stdout
    emitted = cli("emit", "ingest", "--payload", '{"via": "job"}', "--id", "j1")
    assert emitted.returncode == 0, emitted.stderr
    wait_until(
        lambda: '"completed"' in cli("runs", "--json").stdout,
        timeout=60,
        what="the run inside the job",
    )
    stop = cli("down")
    assert stop.returncode == 0, stop.stderr
    time.sleep(1)
    assert '"stopped"' in (tmp_path / "state" / "cluster.json").read_text()


def test_submit_to_an_unreachable_address_fails_with_a_clear_message(tmp_path: Path):
    (tmp_path / "flows.py").write_text(
        "from prefect import flow\n\n@flow\ndef ingest(event=None):\n    return 1\n"
    )
    (tmp_path / "listeners.yaml").write_text(
        yaml.safe_dump({"flows": [{"name": "ingest", "entrypoint": "flows.py:ingest"}]})
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "submit",
            "listeners.yaml",
            "--address",
            f"http://127.0.0.1:{spare_ports(1)[0]}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "cannot reach the Ray Jobs API" in proc.stderr
