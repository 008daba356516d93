"""The CLI as a user drives it: ``up --detach`` → status/emit/runs/pause/resume/dlq → ``down``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.runtime import pid_alive
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.ray

FLOW = textwrap.dedent(
    """
    from prefect import flow

    @flow
    def ingest(event=None):
        if (event or {}).get("payload", {}).get("fail"):
            raise ValueError("asked to fail")
        return "ok"
    """
)


def listeners(
    *args: str, cwd: Path, check: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LISTENERS_CONFIG": str(cwd / "listeners.yaml")}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"listeners {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_detached_cluster_is_driven_through_the_cli_and_stopped_by_down(tmp_path: Path):
    (tmp_path / "flows.py").write_text(FLOW)
    config = {
        "cluster": {"prefect": False, "ingress": {"port": 0}},
        "flows": [
            {
                "name": "ingest",
                "entrypoint": "flows.py:ingest",
                "retries": 0,
                "clocks": [{"type": "webhook"}, {"type": "interval", "every": "1h"}],
            }
        ],
    }
    (tmp_path / "listeners.yaml").write_text(yaml.safe_dump(config))
    up = listeners("up", "listeners.yaml", "--detach", cwd=tmp_path)
    assert "listening" in up.stdout
    try:
        status = as_json(listeners("status", "--json", cwd=tmp_path))
        (flow,) = status["flows"]
        assert flow["state"] == "listening"
        assert sorted(c["type"] for c in flow["clocks"]) == ["interval", "webhook"]
        assert all(c["state"] == "listening" for c in flow["clocks"])

        assert (
            "accepted"
            in listeners(
                "emit", "ingest", "--payload", '{"a": 1}', "--id", "one", cwd=tmp_path
            ).stdout
        )
        assert (
            "duplicate"
            in listeners(
                "emit", "default/ingest", "--payload", '{"a": 1}', "--id", "one", cwd=tmp_path
            ).stdout
        )
        bad = listeners("emit", "ingest", "--payload", "[1]", cwd=tmp_path, check=False)
        assert bad.returncode != 0 and "400" in bad.stderr

        listeners("pause", "ingest", cwd=tmp_path)
        listeners("emit", "ingest", "--payload", '{"a": 2}', "--id", "two", cwd=tmp_path)
        paused = as_json(listeners("status", "--json", cwd=tmp_path))["flows"][0]
        assert paused["state"] == "paused"
        listeners("resume", "ingest", cwd=tmp_path)
        listeners("emit", "ingest", "--payload", '{"fail": true}', "--id", "bad", cwd=tmp_path)

        def runs() -> dict[str, str]:
            doc = as_json(listeners("runs", "--json", cwd=tmp_path))
            return {r["event_id"]: r["state"] for r in doc["runs"]}

        wait_until(
            lambda: runs() == {"one": "completed", "two": "completed", "bad": "dead"},
            timeout=60,
            what="runs to settle",
        )
        dead = as_json(listeners("dlq", "list", "--json", cwd=tmp_path))["dead"]
        assert [(d["event_id"], d["attempts"]) for d in dead] == [("bad", 1)]
        assert "asked to fail" in dead[0]["error"]
        assert "ingest" in listeners("status", cwd=tmp_path).stdout  # the human table
    finally:
        down = listeners("down", cwd=tmp_path, check=False)
    assert down.returncode == 0, down.stderr
    after = as_json(listeners("runs", "--json", cwd=tmp_path))
    assert sorted(r["event_id"] for r in after["runs"]) == ["bad", "one", "two"]
    status_after = as_json(listeners("status", "--json", cwd=tmp_path))
    assert status_after["flows"][0]["runs"]["completed"] == 2
    gone = listeners("emit", "ingest", "--payload", "{}", cwd=tmp_path, check=False)
    assert gone.returncode != 0 and "no cluster is running" in gone.stderr


def test_up_detach_fails_with_the_reason_when_a_clock_cannot_listen(tmp_path: Path):
    (tmp_path / "flows.py").write_text(FLOW)
    config = {
        "cluster": {"prefect": "off", "ingress": {"port": 0}},
        "flows": [
            {
                "name": "ingest",
                "entrypoint": "flows.py:ingest",
                "clocks": [{"type": "directory", "path": "./missing-dir"}],
            }
        ],
    }
    (tmp_path / "listeners.yaml").write_text(yaml.safe_dump(config))
    up = listeners("up", "listeners.yaml", "--detach", "--timeout", "15", cwd=tmp_path, check=False)
    assert up.returncode != 0
    assert "missing-dir" in up.stderr
    state = json.loads((tmp_path / ".listeners" / "cluster.json").read_text())
    assert state["state"] == "failed"


HELD_FLOW = textwrap.dedent(
    """
    import json, os, time
    from prefect import flow

    @flow
    def ingest(event=None):
        while not os.path.exists("go"):  # held until the test has killed the driver
            time.sleep(0.05)
        with open("ran.jsonl", "a") as fh:
            fh.write(json.dumps(event["id"]) + "\\n")
    """
)


def test_driver_killed_with_sigkill_is_replaced_by_the_next_up_and_no_event_is_lost(
    tmp_path: Path,
):
    (tmp_path / "flows.py").write_text(HELD_FLOW)
    config = {
        "cluster": {
            "prefect": "off",
            "ingress": {"port": 0},
            "workers": 1,
            "worker_concurrency": 1,
        },
        "flows": [
            {"name": "ingest", "entrypoint": "flows.py:ingest", "clocks": [{"type": "webhook"}]}
        ],
    }
    (tmp_path / "listeners.yaml").write_text(yaml.safe_dump(config))
    listeners("up", "listeners.yaml", "--detach", cwd=tmp_path)
    try:
        for i in range(8):
            listeners("emit", "ingest", "--payload", "{}", "--id", f"k{i}", cwd=tmp_path)
        state = json.loads((tmp_path / ".listeners" / "cluster.json").read_text())
        pending = as_json(listeners("runs", "--json", cwd=tmp_path))["runs"]
        assert any(r["state"] != "completed" for r in pending)  # the kill lands mid-stream
        os.kill(state["pid"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(state["pid"]), what="the driver to be gone")
        listeners("up", "listeners.yaml", "--detach", cwd=tmp_path)
        (tmp_path / "go").touch()

        def completed() -> set[str]:
            runs = as_json(listeners("runs", "--json", cwd=tmp_path))["runs"]
            return {r["event_id"] for r in runs if r["state"] == "completed"}

        wait_until(
            lambda: {f"k{i}" for i in range(8)} <= completed(),
            timeout=120,
            what="every accepted event to complete after the restart",
        )
    finally:
        listeners("down", cwd=tmp_path, check=False)
    ran = [json.loads(x) for x in (tmp_path / "ran.jsonl").read_text().splitlines()]
    assert sorted(r for r in ran if r.startswith("k")) == [f"k{i}" for i in range(8)]
