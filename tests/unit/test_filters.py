"""Clock filters: JMESPath over the event, validated at config time."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.filters import EventFilter
from cluster.config import ConfigError, config_from_dict

EVENT = {"id": "1", "type": "file", "payload": {"key": "in/a.csv", "size": 10}}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("payload.size > `5`", True),
        ("payload.size > `50`", False),
        ("starts_with(payload.key, 'in/')", True),
        ("payload.missing", False),
        ("starts_with(payload.size, 'x')", False),  # a type error for this event: no match
    ],
)
def test_filter_matches_truthy_results_only(expression: str, expected: bool) -> None:
    assert EventFilter(expression).matches(EVENT) is expected


@pytest.mark.parametrize("expression", ["", "payload.[", 12])
def test_bad_filter_is_a_clear_error(expression: object) -> None:
    with pytest.raises(ValueError, match="filter"):
        EventFilter(expression)  # type: ignore[arg-type]


def flows(clock: dict) -> dict:
    return {"flows": [{"name": "f", "entrypoint": "x.py:f", "clocks": [clock]}]}


def test_every_clock_type_accepts_a_filter_option() -> None:
    cfg = config_from_dict(
        flows({"type": "interval", "every": "1m", "filter": "type == 'tick'"}), Path.cwd()
    )
    assert cfg.clock_specs()[0].options["filter"] == "type == 'tick'"


def test_invalid_filter_names_the_key_path() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(flows({"type": "interval", "every": "1m", "filter": "a.["}), Path.cwd())
    assert "flows[0].clocks[0]" in str(err.value) and "JMESPath" in str(err.value)
