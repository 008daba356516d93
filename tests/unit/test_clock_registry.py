"""The clock registry: connector modules load on first use; a missing extra is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.clocks import CLOCK_TYPES, LAZY_TYPES, MissingDependency
from cluster.config import ConfigError, config_from_dict


@pytest.fixture
def fake_connector(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(LAZY_TYPES, "fake-mq", ("tests.unit.clock_needing_missing_sdk", "fakemq"))
    return "fake-mq"


def test_lookup_of_a_connector_without_its_sdk_names_the_pip_install(fake_connector: str):
    assert fake_connector in CLOCK_TYPES
    with pytest.raises(MissingDependency) as err:
        CLOCK_TYPES[fake_connector]
    message = str(err.value)
    assert "pip install 'listener-cluster[fakemq]'" in message
    assert "listener_cluster_sdk_that_is_not_installed" in message


def test_validate_fails_for_a_connector_without_its_extra(fake_connector: str):
    data = {"flows": [{"name": "f", "entrypoint": "x.py:f", "clocks": [{"type": fake_connector}]}]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, Path.cwd(), source="cfg.yaml")
    text = str(err.value)
    assert "cfg.yaml" in text and "flows[0].clocks[0]" in text
    assert "pip install 'listener-cluster[fakemq]'" in text


def test_built_in_types_are_listed_and_unknown_types_are_not():
    for name in ("interval", "cron", "directory", "s3", "webhook"):
        assert name in CLOCK_TYPES
    assert "kafka" not in CLOCK_TYPES
    with pytest.raises(KeyError):
        CLOCK_TYPES["kafka"]
