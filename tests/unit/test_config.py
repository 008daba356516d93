"""The config contract (SPEC section 2): valid files load; invalid ones name file, key, problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from actors.errors import ListenerError, UnknownFlowError
from cluster.config import (
    ClusterConfig,
    ConfigError,
    FlowRefError,
    config_from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]

FLOWS_PY = """
from prefect import flow

@flow
def ingest(event: dict | None = None):
    return event

@flow
def takes_kwargs(**kwargs):
    return kwargs

@flow
def no_event(x: int = 1):
    return x

@flow
def needs_more(event=None, *, other):
    return other

not_a_flow = 42
"""

MINIMAL = """
flows:
  - name: ingest
    entrypoint: flows.py:ingest
    clocks:
      - {type: interval, every: 60s}
"""


def write_config(folder: Path, text: str, name: str = "listeners.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flows.py").write_text(FLOWS_PY)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path, check_entrypoints: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, check_entrypoints=check_entrypoints)
    return info.value


def assert_problem(err: ConfigError, key: str, *words: str) -> None:
    """Some line of ``err`` names the file and ``key``, and contains every one of ``words``."""
    assert all(line.startswith(f"{err.source}: ") for line in err.lines), err.lines
    matching = [line for line in err.lines if line.startswith(f"{err.source}: {key}: ")]
    assert matching, f"no line about {key!r} in:\n{err}"
    assert any(all(w in line for w in words) for line in matching), f"{words} not in {matching}"


# --- valid configs --------------------------------------------------------------------------


def test_full_spec_example_is_valid_and_resolved() -> None:
    config = load_config(REPO / "configs" / "full.yaml")

    assert config.base_dir == REPO / "configs"
    assert config.state_path == REPO / "configs" / ".listeners"
    assert config.cluster.prefect == "embedded"
    assert config.cluster.ingress.port == 8787
    assert config.tenants[0].token_env == "ACME_TOKEN"
    flow = config.find_flow("acme/ingest")
    assert (flow.event_parameter, flow.retries, flow.retry_delay) == ("event", 3, 1.0)
    specs = {spec.name: spec for spec in config.clock_specs()}
    assert list(specs) == ["interval", "cron", "directory", "s3", "webhook"]
    assert specs["cron"].key == "acme/ingest/cron"
    assert specs["directory"].options == {
        "path": str(REPO / "configs" / "inbox"),
        "pattern": "*.json",
    }
    assert specs["s3"].options["bucket"] == "landing"


def test_minimal_config_gets_defaults_and_implicit_default_tenant(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL))

    assert config.cluster.workers == 2
    assert config.cluster.ledger == "sqlite"
    assert config.ledger_url == f"sqlite:///{tmp_path.resolve() / '.listeners' / 'ledger.db'}"
    assert config.cluster.synchronous == "normal"
    assert config.flows[0].tenant == "default"
    assert [t.name for t in config.all_tenants()] == ["default"]
    assert config.token_for("default") is None
    assert config.flow("default", "ingest").name == "ingest"


def test_bare_off_in_yaml_means_prefect_off(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "cluster: {prefect: off}\n" + MINIMAL))

    assert config.cluster.prefect == "off"


def test_prefect_true_is_an_error(tmp_path: Path) -> None:
    err = config_error(write_config(tmp_path, "cluster: {prefect: on}\n" + MINIMAL))

    assert_problem(err, "cluster.prefect", "embedded, off")


def test_prefect_url_is_accepted_and_other_strings_are_not(tmp_path: Path) -> None:
    url = write_config(tmp_path / "a", "cluster: {prefect: 'http://127.0.0.1:4200/api'}" + MINIMAL)
    assert load_config(url).cluster.prefect == "http://127.0.0.1:4200/api"

    err = config_error(write_config(tmp_path / "b", "cluster: {prefect: cloud}\n" + MINIMAL))
    assert_problem(err, "cluster.prefect", "'cloud'")


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = """
    cluster: {state_dir: state, ledger: "sqlite:///db/ledger.sqlite"}
    flows:
      - name: files
        entrypoint: flows.py:ingest
        clocks: [{type: directory, path: ./inbox}]
    """
    path = write_config(tmp_path / "conf", text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("..") / "conf" / "listeners.yaml")

    conf = (tmp_path / "conf").resolve()
    assert config.base_dir == conf == path.parent.resolve()
    assert config.state_path == conf / "state"
    assert config.ledger_url == f"sqlite:///{conf / 'db' / 'ledger.sqlite'}"
    assert config.clock_specs()[0].options["path"] == str(conf / "inbox")
    assert config.flows[0].clocks[0].options["path"] == "./inbox"  # as written


def test_repeated_clock_types_get_numbered_names(tmp_path: Path) -> None:
    text = """
    flows:
      - name: ticks
        entrypoint: flows.py:ingest
        clocks:
          - {type: interval, every: 1s}
          - {type: interval, every: 2s, name: interval-2}
          - {type: interval, every: 3s}
          - {type: webhook, name: hook}
    """
    config = load_config(write_config(tmp_path, text))

    assert [s.name for s in config.clock_specs()] == [
        "interval",
        "interval-2",
        "interval-3",
        "hook",
    ]


def test_flow_without_clocks_is_allowed(tmp_path: Path) -> None:
    text = "flows: [{name: emitted, entrypoint: 'flows.py:ingest'}]\n"
    config = load_config(write_config(tmp_path, text))

    assert config.flows[0].clocks == []
    assert config.clock_specs() == []


def test_retry_delay_accepts_durations(tmp_path: Path) -> None:
    text = """
    flows:
      - {name: a, entrypoint: "flows.py:ingest", retry_delay: 250ms}
      - {name: b, entrypoint: "flows.py:ingest", retry_delay: 5m}
      - {name: c, entrypoint: "flows.py:ingest", retry_delay: 2}
    """
    config = load_config(write_config(tmp_path, text))

    assert [f.retry_delay for f in config.flows] == [0.25, 300.0, 2.0]


def test_config_from_dict_and_model_dump_round_trip(tmp_path: Path) -> None:
    data = {
        "flows": [
            {
                "name": "ingest",
                "entrypoint": "flows.py:ingest",
                "clocks": [
                    {"type": "directory", "path": "inbox"},
                    {"type": "cron", "cron": "0 * * * *"},
                ],
            }
        ]
    }

    config = config_from_dict(data, tmp_path)
    again = config_from_dict(config.model_dump(), tmp_path)

    assert config.source == "<dict>"
    assert again == config
    assert again.clock_specs()[0].options["path"] == str(tmp_path.resolve() / "inbox")


# --- lookups --------------------------------------------------------------------------------


TWO_TENANTS = """
tenants:
  - {name: acme, token_env: ACME_TOKEN}
  - {name: beta}
flows:
  - {name: ingest, tenant: acme, entrypoint: "flows.py:ingest"}
  - {name: ingest, tenant: beta, entrypoint: "flows.py:ingest"}
  - {name: nightly, tenant: beta, entrypoint: "flows.py:ingest"}
"""


def test_find_flow_by_tenant_and_name_or_unique_bare_name(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, TWO_TENANTS))

    assert config.find_flow("beta/ingest").tenant == "beta"
    assert config.find_flow("nightly").ref == "beta/nightly"
    with pytest.raises(FlowRefError, match="ambiguous"):
        config.find_flow("ingest")
    with pytest.raises(FlowRefError, match="unknown flow 'acme/nightly'"):
        config.find_flow("acme/nightly")
    with pytest.raises(UnknownFlowError):
        config.flow("acme", "nope")


def test_token_for_reads_the_named_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path, TWO_TENANTS))
    monkeypatch.delenv("ACME_TOKEN", raising=False)
    assert config.token_for("acme") is None
    assert config.missing_tokens() == ["ACME_TOKEN"]

    monkeypatch.setenv("ACME_TOKEN", "s3cret")
    assert config.token_for("acme") == "s3cret"
    assert config.token_for("beta") is None
    assert config.missing_tokens() == []


# --- invalid files --------------------------------------------------------------------------


def test_missing_file_empty_file_and_non_mapping_are_clear(tmp_path: Path) -> None:
    missing = config_error(tmp_path / "nope.yaml")
    assert missing.lines == [f"{tmp_path / 'nope.yaml'}: no such file"]

    empty = config_error(write_config(tmp_path, "# nothing\n", "empty.yaml"))
    assert "empty" in str(empty) and str(tmp_path / "empty.yaml") in str(empty)

    listed = config_error(write_config(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "top level must be a mapping" in str(listed)
    assert isinstance(listed, ListenerError)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "flows:\n  - name: x\n    entrypoint: [unclosed\n")

    err = config_error(path)

    assert len(err.lines) == 1
    assert err.lines[0].startswith(f"{path}: line ")
    assert "YAML syntax error" in err.lines[0]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    err = config_error(write_config(tmp_path, "cluster: {}\n" + MINIMAL + "cluster: {}\n"))

    assert "line 8" in str(err) and "'cluster' appears twice" in str(err)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    err = config_error(write_config(tmp_path, "cluster: {workers: 3}\n"))
    assert err.lines == [f"{err.source}: flows: required key is missing"]

    err = config_error(write_config(tmp_path, "flows: [{name: x, clocks: []}]\n"))
    assert_problem(err, "flows[0].entrypoint", "required key is missing")

    err = config_error(write_config(tmp_path, "flows: []\n"))
    assert_problem(err, "flows", "at least 1 item")


def test_unknown_keys_are_errors_at_every_level(tmp_path: Path) -> None:
    text = """
    clusters: {}
    cluster:
      ingress: {host: 127.0.0.1, prot: 1}
    flows:
      - name: ingest
        entrypoint: flows.py:ingest
        retry: 2
        clocks:
          - {type: interval, every: 60s, evry: 5s}
    """
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "clusters", "unknown key", "cluster, flows, tenants")
    assert_problem(err, "cluster.ingress.prot", "unknown key", "host, port")
    assert_problem(err, "flows[0].retry", "unknown key", "retries")
    assert_problem(err, "flows[0].clocks[0].evry", "unknown option", "anchor, catchup, every")


def test_bad_values_name_key_and_value(tmp_path: Path) -> None:
    text = """
    cluster:
      workers: 0
      ledger: mysql://localhost/x
      ray_address: "not an address"
      synchronous: extra
      ingress: {port: "8787"}
    tenants: [{name: Acme, token_env: "1BAD"}]
    flows:
      - {name: ingest, entrypoint: "flows.py:ingest", retries: -1, retry_delay: soon}
    """
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "cluster.workers", "greater than or equal to 1")
    assert_problem(err, "cluster.ledger", "'mysql://localhost/x'", "postgresql://")
    assert_problem(err, "cluster.ray_address", "not a Ray address")
    assert_problem(err, "cluster.synchronous", "'normal' or 'full'", "got 'extra'")
    assert_problem(err, "cluster.ingress.port", "integer", "got '8787'")
    assert_problem(err, "tenants[0].name", "'Acme'", "lowercase")
    assert_problem(err, "tenants[0].token_env", "'1BAD'")
    assert_problem(err, "flows[0].retries", "greater than or equal to 0")
    assert_problem(err, "flows[0].retry_delay", "'soon'")


def test_tracked_concurrency_defaults_and_must_be_positive(tmp_path: Path) -> None:
    from actors.worker import TRACKED_CONCURRENCY

    assert load_config(write_config(tmp_path, MINIMAL)).cluster.tracked_concurrency == (
        TRACKED_CONCURRENCY
    )
    set_to_8 = "cluster: {tracked_concurrency: 8}\n" + MINIMAL
    assert load_config(write_config(tmp_path / "ok", set_to_8)).cluster.tracked_concurrency == 8
    for value, words in (("0", ["greater than or equal to 1"]), ("many", ["integer", "'many'"])):
        text = f"cluster: {{tracked_concurrency: {value}}}\n" + MINIMAL
        err = config_error(write_config(tmp_path / value, text))
        assert_problem(err, "cluster.tracked_concurrency", *words)


def test_bad_cron_names_the_cron_option(tmp_path: Path) -> None:
    text = """
    flows:
      - name: ingest
        entrypoint: flows.py:ingest
        clocks:
          - {type: interval, every: 60s}
          - {type: cron, cron: "*/5 * * *"}
    """
    err = config_error(write_config(tmp_path, text))

    assert err.lines == [
        f"{err.source}: flows[0].clocks[1].cron: option 'cron' must have 5 fields "
        "(minute hour day month weekday), got '*/5 * * *'"
    ]


def test_clock_missing_its_required_option(tmp_path: Path) -> None:
    text = "flows: [{name: a, entrypoint: 'flows.py:ingest', clocks: [{type: interval}]}]\n"
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "flows[0].clocks[0]", "needs option 'every'")


def test_unknown_clock_type_lists_known_types(tmp_path: Path) -> None:
    text = "flows: [{name: a, entrypoint: 'flows.py:ingest', clocks: [{type: kafka}, {}]}]\n"
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "flows[0].clocks[0].type", "'kafka'", "cron, directory, interval")
    assert_problem(err, "flows[0].clocks[1].type", "required key is missing")


def test_duplicate_names_are_errors_at_the_repeat(tmp_path: Path) -> None:
    text = """
    tenants: [{name: acme}, {name: acme}]
    flows:
      - {name: ingest, tenant: acme, entrypoint: "flows.py:ingest"}
      - {name: other, entrypoint: "flows.py:ingest"}
      - {name: ingest, tenant: acme, entrypoint: "flows.py:ingest"}
    """
    err = config_error(write_config(tmp_path, text))

    assert err.lines == [
        f"{err.source}: tenants[1].name: tenant 'acme' is already declared at tenants[0]",
        f"{err.source}: flows[2].name: flow 'ingest' of tenant 'acme' is already defined "
        "at flows[0]",
    ]


def test_duplicate_clock_names_in_a_flow(tmp_path: Path) -> None:
    text = """
    flows:
      - name: a
        entrypoint: flows.py:ingest
        clocks: [{type: webhook, name: hook}, {type: interval, every: 1s, name: hook}]
    """
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "flows[0].clocks[1].name", "'hook' is already used by clocks[0]")


def test_undeclared_tenant_is_an_error(tmp_path: Path) -> None:
    text = """
    tenants: [{name: acme}]
    flows: [{name: a, tenant: beta, entrypoint: "flows.py:ingest"}]
    """
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "flows[0].tenant", "'beta' is not declared", "acme")


def test_tenant_over_max_listeners_is_an_error(tmp_path: Path) -> None:
    text = """
    tenants: [{name: acme, quotas: {max_listeners: 2}}]
    flows:
      - name: a
        tenant: acme
        entrypoint: flows.py:ingest
        clocks: [{type: webhook}, {type: interval, every: 1s}, {type: cron, cron: "@daily"}]
    """
    err = config_error(write_config(tmp_path, text))

    assert_problem(err, "tenants[0].quotas.max_listeners", "3 clocks", "2")


# --- entrypoints ----------------------------------------------------------------------------


def entrypoint_config(tmp_path: Path, entrypoint: str, extra: str = "") -> Path:
    return write_config(
        tmp_path, f"flows: [{{name: a, entrypoint: '{entrypoint}'{extra}}}]\n", "listeners.yaml"
    )


def test_entrypoints_that_import_and_take_the_event_are_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_config(entrypoint_config(tmp_path / "a", "flows.py:ingest"))
    load_config(entrypoint_config(tmp_path / "b", "flows.py:takes_kwargs"))
    load_config(entrypoint_config(tmp_path / "c", "flows.py:no_event", ", event_parameter: x"))
    (tmp_path / "cfg_test_flows_mod.py").write_text(FLOWS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_config(entrypoint_config(tmp_path / "d", "cfg_test_flows_mod:ingest"))


def test_entrypoint_that_does_not_import(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    path = entrypoint_config(tmp_path, "broken.py:ingest")

    err = config_error(path, check_entrypoints=True)

    assert_problem(err, "flows[0].entrypoint", "does not import", "not_a_module_anywhere")


def test_entrypoint_missing_file_function_or_not_a_flow(tmp_path: Path) -> None:
    text = """
    flows:
      - {name: a, entrypoint: "missing.py:ingest"}
      - {name: b, entrypoint: "flows.py:nope"}
      - {name: c, entrypoint: "flows.py:not_a_flow"}
    """
    err = config_error(write_config(tmp_path, text), check_entrypoints=True)

    assert_problem(err, "flows[0].entrypoint", "does not exist")
    assert_problem(err, "flows[1].entrypoint", "no attribute 'nope'")
    assert_problem(err, "flows[2].entrypoint", "not a Prefect @flow")
    assert load_config(write_config(tmp_path, text), check_entrypoints=False)


def test_entrypoint_missing_the_event_parameter(tmp_path: Path) -> None:
    err = config_error(entrypoint_config(tmp_path, "flows.py:no_event"), check_entrypoints=True)

    assert_problem(err, "flows[0].entrypoint", "no parameter 'event'", "parameters: x")


def test_entrypoint_with_other_required_parameters(tmp_path: Path) -> None:
    err = config_error(entrypoint_config(tmp_path, "flows.py:needs_more"), check_entrypoints=True)

    assert_problem(err, "flows[0].entrypoint", "without a default (other)")


def test_malformed_entrypoint_is_a_validation_error(tmp_path: Path) -> None:
    err = config_error(entrypoint_config(tmp_path, "flows.py"))

    assert_problem(err, "flows[0].entrypoint", "must look like")


def test_model_validate_without_context_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = ClusterConfig.model_validate({"flows": [{"name": "a", "entrypoint": "m:f"}]})

    assert config.base_dir == tmp_path.resolve()


def test_example_flows_take_the_event_or_nothing() -> None:
    from actors.entrypoint import load_flow

    ingest = load_flow(str(REPO / "examples" / "flows.py") + ":ingest")
    nightly = load_flow(str(REPO / "examples" / "flows.py") + ":nightly")

    assert ingest.fn({"id": "e1", "source": "webhook", "payload": {}}) == {
        "id": "e1",
        "source": "webhook",
    }
    assert ingest.fn() == {"id": None, "source": None}
    assert nightly.fn({"id": "cron:2024-01-01T00:00:00Z"}) == "cron:2024-01-01T00:00:00Z"
    assert nightly.fn() is None


def test_batch_delivery_parses_with_defaults_and_durations(tmp_path: Path) -> None:
    from cluster.config import BatchDelivery, config_from_dict

    flows = [
        {"name": "a", "entrypoint": "x.py:f", "delivery": "batch"},
        {
            "name": "b",
            "entrypoint": "x.py:f",
            "delivery": {"mode": "batch", "max_events": 10, "max_wait": "250ms"},
        },
        {"name": "c", "entrypoint": "x.py:f"},
    ]
    cfg = config_from_dict({"flows": flows}, tmp_path)
    a, b, c = (f.delivery for f in cfg.flows)
    assert isinstance(a, BatchDelivery) and (a.max_events, a.max_wait) == (100, 1.0)
    assert isinstance(b, BatchDelivery) and (b.max_events, b.max_wait) == (10, 0.25)
    assert c == "event"


def test_bad_batch_delivery_names_the_key(tmp_path: Path) -> None:
    import pytest as _pytest

    from cluster.config import ConfigError, config_from_dict

    flows = [{"name": "a", "entrypoint": "x.py:f", "delivery": {"mode": "batch", "max_events": 0}}]
    with _pytest.raises(ConfigError) as err:
        config_from_dict({"flows": flows}, tmp_path, source="cfg.yaml")
    assert "flows[0].delivery" in str(err.value)


def test_a_postgresql_ledger_with_a_bad_namespace_is_refused(tmp_path: Path) -> None:
    text = """
    cluster: {ledger: "postgresql://u:pw@db:5432/x?namespace=Bad-Name"}
    flows: [{name: ingest, entrypoint: "flows.py:ingest"}]
    """
    err = config_error(write_config(tmp_path, text))
    assert_problem(err, "cluster.ledger", "not a schema name", "u:***@db")
    assert ":pw@" not in str(err)


def test_a_postgresql_ledger_url_is_kept_as_written(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/test?namespace=team_a"
    path = write_config(
        tmp_path,
        f'cluster: {{ledger: "{url}"}}\nflows: [{{name: ingest, entrypoint: "flows.py:ingest"}}]',
    )
    assert load_config(path, check_entrypoints=False).ledger_url == url
