"""A bounded chaos run in CI: kills of every kind while events flow; nothing lost or doubled."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def load_chaos():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("chaos_script", ROOT / "scripts" / "chaos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chaos_with_kills_of_hosts_coordinator_and_workers_loses_nothing_runs_nothing_twice(
    ray_session: None,
):
    chaos = load_chaos()
    args = argparse.Namespace(events=3000, rate=250, kill_every="1-2", settle=240)
    result = chaos.run(args)
    assert result["events_sent"] == 3000
    assert result["lost"] == 0, result
    assert result["duplicate_completions"] == 0, result
    kinds = {k.split(":")[0] for k in result["kills"]}
    assert {"host", "coordinator", "worker"} <= kinds, result
