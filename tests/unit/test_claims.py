"""Claim batches: events grouped per flow run, and their wire form."""

from __future__ import annotations

import msgpack
import pytest
from helpers import make_event

from actors.claims import FlowBatch, batches_of, in_input_order, pack_batches, unpack_batches
from actors.errors import EventError
from actors.event import Event


def test_events_are_grouped_per_flow_and_answers_mapped_back_to_input_order() -> None:
    events = [
        make_event("a"),
        make_event("b"),
        make_event("c", flow="other"),
        make_event("d", tenant="beta"),
        make_event("e"),
    ]
    runs, order = batches_of(events)
    assert [(b.tenant, b.flow, b.ids) for b in runs] == [
        ("acme", "ingest", ["a", "b", "e"]),
        ("acme", "other", ["c"]),
        ("beta", "ingest", ["d"]),
    ]
    assert order == [0, 1, 4, 2, 3]
    answers = [e.id for b in runs for e in b.events()]  # per event, in batch order
    assert in_input_order(answers, order) == ["a", "b", "c", "d", "e"]


def test_events_already_in_runs_of_one_flow_keep_their_order() -> None:
    events = [make_event("a"), make_event("b"), make_event("c", flow="other")]
    runs, order = batches_of(events)
    assert order is None
    assert [e for b in runs for e in b.events()] == events
    assert in_input_order(["x", "y", "z"], None) == ["x", "y", "z"]
    assert batches_of([]) == ([], None)


def test_a_batch_survives_the_wire_and_decodes_only_the_events_asked_for() -> None:
    events = [make_event(f"e{i}", payload={"n": i, "blob": "x" * i}) for i in range(5)]
    (run,) = unpack_batches(pack_batches(batches_of(events)[0]))
    assert run.ids == ["e0", "e1", "e2", "e3", "e4"]
    assert run.events([3, 1]) == [events[3], events[1]]
    assert [bytes(b) for b in run.blobs()] == [
        msgpack.packb(e.to_wire(), use_bin_type=True) for e in events
    ]
    assert all(isinstance(b, bytearray) for b in run.blobs())
    head = run.take(2)
    assert head.ids == ["e0", "e1"] and head.events() == events[:2]
    assert run.take(9) is run


def test_given_bytes_are_kept_as_they_are() -> None:
    events = [make_event("a"), make_event("b")]
    packed = [b"\x91\xa1a", b"\x91\xa1b"]  # not the events' own encoding: kept, not redone
    (run,), _ = batches_of(events, packed)
    assert [bytes(b) for b in run.blobs()] == packed


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "malformed claim batch"),
        (msgpack.packb([["acme", "ingest", ["a"]]]), "malformed claim batch"),
        (msgpack.packb([["acme", "ingest", ["a", "b"], b"\x90", [1]]]), "2 ids, 1 ends"),
        (msgpack.packb([["acme", "ingest", ["a"], b"\x90", [5]]]), "1 ids, 1 ends, 1 bytes"),
    ],
)
def test_a_malformed_batch_is_refused_with_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message) as info:
        unpack_batches(data)
    assert info.value.reason == "malformed"


def test_an_empty_run_has_no_events() -> None:
    run = FlowBatch("acme", "ingest", [], b"", [])
    assert len(run) == 0 and run.blobs() == [] and run.events() == []


def test_a_batch_naming_its_flow_with_a_number_is_refused() -> None:
    with pytest.raises(EventError, match="tenant and flow must be strings"):
        unpack_batches(msgpack.packb([[1, "ingest", [], b"", []]]))


# -- the wire form keeps every field of every event ------------------------------------------
WIRE_EVENTS = [
    Event("a", "acme", "ingest", "s3://b/k", "object", "2024-01-01T00:00:00+00:00", {"k": 1}),
    Event("b", "beta", "f", "webhook", "webhook", payload=[1, "two", None], received=12.5),
    Event("ü-日本", "acme", "ingest", "file", "file", payload={"nested": {"x": [1.5, True]}}),
    Event("big", "acme", "ingest", "file", "file", payload={"big": "x" * 70_000}),
]


def test_pack_unpack_round_trip_keeps_every_field() -> None:
    batches, order = batches_of(WIRE_EVENTS)
    decoded = [e for b in unpack_batches(pack_batches(batches)) for e in b.events()]
    assert in_input_order(decoded, order) == WIRE_EVENTS


def test_pack_of_no_batches_round_trips_to_no_batches() -> None:
    assert unpack_batches(pack_batches([])) == []


def test_each_event_crosses_as_its_own_encoding() -> None:
    batches, order = batches_of(WIRE_EVENTS)
    wire = in_input_order(
        [w for b in unpack_batches(pack_batches(batches)) for w in b.blobs()], order
    )
    assert [bytes(w) for w in wire] == [
        msgpack.packb(e.to_wire(), use_bin_type=True) for e in WIRE_EVENTS
    ]
    assert [Event.from_wire(msgpack.unpackb(w, raw=False)) for w in wire] == WIRE_EVENTS
