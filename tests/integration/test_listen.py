"""``listen()`` (PIN 14's ``FlowRunner.listen``) from a plain Python script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent(
    """
    import json
    from prefect import flow
    from cluster import listen
    from cluster.clocks import DirectoryClock, IntervalClock

    @flow
    def hello(event=None):
        with open("ran.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\\n")

    if __name__ == "__main__":
        listen(hello, clocks=[IntervalClock("1s"), DirectoryClock("./inbox", pattern="*.json")],
               prefect="off", ingress_port=0)
    """
)


def test_listen_runs_a_flow_from_a_plain_script_until_sigterm(tmp_path: Path):
    (tmp_path / "app.py").write_text(SCRIPT)
    (tmp_path / "inbox").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )
    try:
        log = tmp_path / "ran.jsonl"

        def events() -> list[dict]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        wait_until(
            lambda: any(e["type"] == "tick" for e in events()), timeout=120, what="an interval tick"
        )
        (tmp_path / "inbox" / "a.json").write_text('{"hello": "world"}')
        wait_until(
            lambda: any(e["type"] == "file" for e in events()), timeout=30, what="the file event"
        )
        (file_event,) = [e for e in events() if e["type"] == "file"]
        assert file_event["payload"]["content"] == {"hello": "world"}
        assert file_event["flow"] == "hello" and file_event["tenant"] == "default"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output
