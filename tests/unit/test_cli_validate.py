"""``listeners validate``: exit 0 for a good file; one clear message naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

GOOD_FLOW = "from prefect import flow\n\n@flow\ndef ingest(event=None):\n    return 1\n"


def validate(tmp_path: Path, text: str) -> tuple[int, str]:
    (tmp_path / "flows.py").write_text(GOOD_FLOW)
    (tmp_path / "bad.yaml").write_text(text)
    result = runner.invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    return result.exit_code, result.output


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/local.yaml", "configs/full.yaml"])
def test_shipped_configs_validate(config: str):
    result = runner.invoke(app, ["validate", str(ROOT / config)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("flows:\n  - name: ingest\n    clocks: []\n", "flows[0].entrypoint", "required"),
        (
            "flows:\n  - name: ingest\n    entrypoint: flows.py:ingest\n    colour: red\n",
            "flows[0].colour",
            "unknown",
        ),
        (
            "flows:\n  - name: ingest\n    entrypoint: flows.py:ingest\n"
            "    clocks: [{type: cron, cron: '61 * * * *'}]\n",
            "flows[0].clocks[0].cron",
            "cron",
        ),
        (
            "flows:\n  - name: ingest\n    entrypoint: flows.py:ingest\n"
            "    clocks: [{type: kafka}]\n",
            "flows[0].clocks[0]",
            "kafka",
        ),
        (
            "flows:\n  - name: ingest\n    entrypoint: nothere.py:ingest\n",
            "flows[0].entrypoint",
            "does not exist",
        ),
        (
            "flows:\n  - name: ingest\n    entrypoint: flows.py:missing\n",
            "flows[0].entrypoint",
            "missing",
        ),
    ],
    ids=["missing-key", "unknown-key", "bad-cron", "unknown-clock-type", "no-file", "no-function"],
)
def test_broken_config_fails_with_file_key_and_problem(tmp_path, text, key, problem):
    code, output = validate(tmp_path, text)
    assert code != 0
    assert "bad.yaml" in output
    assert key in output
    assert problem in output.lower()
