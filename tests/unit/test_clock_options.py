"""check_options: what ``listeners validate`` calls; each bad option is named in the error."""

from __future__ import annotations

from typing import Any

import pytest

from actors.clocks import CLOCK_TYPES
from actors.clocks.time import parse_duration

SPEC_EXAMPLES: list[dict[str, Any]] = [
    {"type": "interval", "every": "60s"},
    {"type": "cron", "cron": "*/5 * * * *"},
    {"type": "directory", "path": "./inbox", "pattern": "*.json"},
    {
        "type": "s3",
        "bucket": "landing",
        "prefix": "incoming/",
        "endpoint_url": "http://127.0.0.1:5000",
    },
    {"type": "webhook"},
]
# One minimal valid entry per connector of the event-hook library.
CONNECTOR_EXAMPLES: list[dict[str, Any]] = [
    {"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/orders"},
    {"type": "s3-sqs", "queue_name": "landing-events"},
    {"type": "redis-stream", "stream": "orders"},
    {"type": "nats", "stream": "ORDERS", "subject": "orders.>"},
    {"type": "amqp", "queue": "orders"},
    {"type": "mqtt", "topic": "sensors/+/reading"},
    {"type": "postgres", "table": "outbox"},
    {"type": "prefect-event", "event": ["prefect.flow-run.Completed"]},
    {"type": "rrule", "rrule": "FREQ=WEEKLY;BYDAY=MO;BYHOUR=9;BYMINUTE=0"},
]


def check(options: dict[str, Any]) -> None:
    CLOCK_TYPES[options["type"]].check_options(options)


@pytest.mark.parametrize("entry", SPEC_EXAMPLES, ids=lambda e: e["type"])
def test_the_clocks_of_the_spec_example_config_are_valid(entry: dict[str, Any]) -> None:
    check(entry)


@pytest.mark.parametrize("clock_type", sorted(CLOCK_TYPES))
def test_every_clock_declares_its_options_and_accepts_a_name(clock_type: str) -> None:
    cls = CLOCK_TYPES[clock_type]
    assert isinstance(cls.options, frozenset)
    entry = next(e for e in SPEC_EXAMPLES + CONNECTOR_EXAMPLES if e["type"] == clock_type)
    check({**entry, "name": "mine"})


@pytest.mark.parametrize("entry", SPEC_EXAMPLES, ids=lambda e: e["type"])
def test_an_unknown_option_is_named_in_the_error(entry: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown option 'evrey'"):
        check({**entry, "evrey": 1})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "interval"}, "needs option 'every'"),
        ({"type": "interval", "every": "soon"}, "option 'every': bad duration 'soon'"),
        ({"type": "interval", "every": 0}, "option 'every': duration must be positive"),
        ({"type": "interval", "every": True}, "option 'every'"),
        ({"type": "interval", "every": "1m", "anchor": "noon"}, "option 'anchor': bad ISO"),
        ({"type": "cron"}, "needs option 'cron'"),
        ({"type": "cron", "cron": "*/5 * * *"}, "option 'cron' must have 5 fields"),
        ({"type": "cron", "cron": "0 0 * * * *"}, "option 'cron' must have 5 fields"),
        ({"type": "cron", "cron": "61 * * * *"}, "option 'cron' is not a valid cron"),
        ({"type": "cron", "cron": "0 * * * *", "timezone": "Mars/Olympus"}, "'timezone'"),
        ({"type": "directory"}, "needs option 'path'"),
        ({"type": "directory", "path": "/in", "format": "xml"}, "option 'format'"),
        ({"type": "directory", "path": "/in", "recursive": "yes"}, "option 'recursive'"),
        ({"type": "directory", "path": "/in", "stable_ms": 0.5}, "option 'stable_ms'"),
        ({"type": "directory", "path": "/in", "poll_interval": -1}, "option 'poll_interval'"),
        ({"type": "directory", "path": "/in", "max_bytes": 0}, "option 'max_bytes'"),
        ({"type": "directory", "path": "/in", "pattern": ""}, "option 'pattern'"),
        ({"type": "s3"}, "needs option 'bucket'"),
        ({"type": "s3", "bucket": "b", "endpoint_url": "127.0.0.1:5000"}, "'endpoint_url'"),
        ({"type": "s3", "bucket": "b", "poll_interval": 0.01}, "option 'poll_interval'"),
        ({"type": "s3", "bucket": "b", "max_keys": 5000}, "option 'max_keys'"),
        ({"type": "s3", "bucket": "b", "prefix": 3}, "option 'prefix'"),
        ({"type": "webhook", "path": "/hook"}, "unknown option 'path'"),
    ],
)
def test_a_bad_option_is_named_in_the_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        check(options)


def test_cron_accepts_a_timezone_and_the_at_aliases() -> None:
    check({"type": "cron", "cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"})
    check({"type": "cron", "cron": "@hourly"})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1.5s", 1.5),
        ("90", 90.0),
        (90, 90.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration_reads_units_and_plain_seconds(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "1x", "m", "-5s", "5 m s", None, [], False, -1, 0])
def test_parse_duration_rejects_anything_else(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
