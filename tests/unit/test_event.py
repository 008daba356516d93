"""The event model: ingress body parsing, id checks, wire encoding and body hashes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from actors.errors import EventError
from actors.event import (
    MAX_ID_LENGTH,
    Event,
    body_hash,
    check_event_id,
    iso,
    parse_ingress_body,
)


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


# -- parse_ingress_body --------------------------------------------------------------------
def test_body_with_id_and_payload_is_parsed() -> None:
    assert parse_ingress_body(body({"id": "e1", "payload": {"a": 1}})) == ("e1", {"a": 1})


def test_body_without_id_gives_none_for_the_id() -> None:
    assert parse_ingress_body(body({"payload": {}})) == (None, {})


def test_body_may_carry_type_and_occurred() -> None:
    doc = {"id": "e", "payload": {}, "type": "x", "occurred": "2024-01-01T00:00:00+00:00"}
    assert parse_ingress_body(body(doc)) == ("e", {})


def test_body_over_the_limit_is_too_large_with_status_413() -> None:
    raw = body({"payload": {"x": "y" * 100}})
    with pytest.raises(EventError) as err:
        parse_ingress_body(raw, max_bytes=len(raw) - 1)
    assert (err.value.reason, err.value.status) == ("too_large", 413)


def test_body_exactly_at_the_limit_is_accepted() -> None:
    raw = body({"payload": {"x": "y"}})
    assert parse_ingress_body(raw, max_bytes=len(raw)) == (None, {"x": "y"})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"text"', "must be a JSON object, got str"),
        (b'{"payload": {}, "extra": 1}', "unknown keys in body: ['extra']"),
        (b'{"id": "e"}', "no 'payload'"),
        (b'{"payload": [1]}', "'payload' must be a JSON object, got list"),
        (b'{"payload": null}', "'payload' must be a JSON object, got NoneType"),
    ],
)
def test_malformed_body_is_rejected_with_status_400(raw: bytes, message: str) -> None:
    with pytest.raises(EventError) as err:
        parse_ingress_body(raw)
    assert message in str(err.value)
    assert (err.value.reason, err.value.status) == ("malformed", 400)


@pytest.mark.parametrize("bad_id", ["", 7, ["a"], "x" * (MAX_ID_LENGTH + 1)])
def test_body_with_bad_id_is_rejected(bad_id: object) -> None:
    with pytest.raises(EventError) as err:
        parse_ingress_body(body({"id": bad_id, "payload": {}}))
    assert (err.value.reason, err.value.status) == ("bad_id", 400)


# -- check_event_id ------------------------------------------------------------------------
def test_id_at_the_length_limit_is_accepted() -> None:
    assert check_event_id("x" * MAX_ID_LENGTH) == "x" * MAX_ID_LENGTH


@pytest.mark.parametrize("bad_id", [None, "", 1, b"bytes", "x" * (MAX_ID_LENGTH + 1)])
def test_non_string_empty_or_overlong_ids_are_bad(bad_id: object) -> None:
    with pytest.raises(EventError) as err:
        check_event_id(bad_id)
    assert err.value.reason == "bad_id"


def test_event_dict_is_what_a_flow_receives_without_internal_fields() -> None:
    ev = Event("a", "acme", "ingest", "src", "t", "2024-01-01T00:00:00+00:00", {"x": 1}, 9.0)
    assert ev.to_dict() == {
        "id": "a",
        "tenant": "acme",
        "flow": "ingest",
        "source": "src",
        "type": "t",
        "occurred": "2024-01-01T00:00:00+00:00",
        "payload": {"x": 1},
    }
    assert ev.key == ("acme", "ingest", "a")


def test_event_from_dict_fills_defaults() -> None:
    ev = Event.from_dict({"id": 5, "tenant": "acme", "flow": "ingest"})
    assert (ev.id, ev.source, ev.type, ev.payload, ev.received) == ("5", "", "event", None, 0.0)
    assert ev.occurred  # now, in ISO


# -- body_hash and times -------------------------------------------------------------------
def test_body_hash_ignores_key_order_and_whitespace() -> None:
    assert body_hash({"a": 1, "b": [1, 2]}) == body_hash(json.loads('{ "b": [1,2], "a": 1 }'))


def test_body_hash_is_stable_across_calls_and_prefixed() -> None:
    h = body_hash({"x": "ü"})
    assert h == body_hash({"x": "ü"})
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64


def test_body_hash_differs_for_different_payloads() -> None:
    assert body_hash({"a": 1}) != body_hash({"a": 2})
    assert body_hash({"a": 1}) != body_hash({"a": "1"})


def test_iso_treats_naive_times_as_utc_and_converts_others() -> None:
    naive = datetime(2024, 1, 1, 12, 0)
    plus_two = datetime(2024, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert iso(naive) == iso(plus_two) == "2024-01-01T12:00:00+00:00"
