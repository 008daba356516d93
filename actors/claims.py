"""Claim batches: events on their way from a host into the ledger, grouped per flow.

A host reads events of one flow at a time, and the ledger keys them per flow, so a batch
crosses to the coordinator as runs of one flow each: a :class:`FlowBatch` holds the run's
event ids and every event's own msgpack bytes (``packb(event.to_wire())``, what the ledger
stores), concatenated. The coordinator claims straight from that: it never decodes the
events it only stores (a duplicate, or a new event that waits in the ledger while its flow's
queue is full), and decodes the rest one at a time when they join a queue.

Wire form of a batch: one msgpack array of ``[tenant, flow, ids, data, ends]``, where event
``i`` of a run is ``data[ends[i-1]:ends[i]]`` (``ends[-1]`` is 0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, TypeVar

import msgpack

from actors.errors import EventError
from actors.event import Event

T = TypeVar("T")
_local = threading.local()


def _packer() -> Callable[[Any], bytes]:
    """This thread's reusable msgpack packer (~1 µs an event cheaper than ``packb``, which
    builds a packer per call; one packer must not serve two threads at once)."""
    pack: Callable[[Any], bytes] | None = getattr(_local, "pack", None)
    if pack is None:
        pack = _local.pack = msgpack.Packer(use_bin_type=True).pack
    return pack


@dataclass(slots=True)
class FlowBatch:
    """Events of one flow: their ids, and each event's msgpack bytes in ``data``."""

    tenant: str
    flow: str
    ids: list[str]
    data: bytes | bytearray
    ends: list[int]

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.flow)

    def __len__(self) -> int:
        return len(self.ids)

    def blobs(self) -> list[bytearray]:
        """Each event's bytes, as ``bytearray`` slices (sqlite3 binds those without its
        adapter lookup, which costs ``bytes`` ~7% of a claim)."""
        buffer = self.data if isinstance(self.data, bytearray) else bytearray(self.data)
        ends = self.ends
        return [buffer[a:b] for a, b in zip([0, *ends], ends, strict=False)]

    def event(self, i: int) -> Event:
        start = self.ends[i - 1] if i else 0
        return Event.from_wire(msgpack.unpackb(self.data[start : self.ends[i]], raw=False))

    def events(self, positions: Sequence[int] | None = None) -> list[Event]:
        """The events (those at ``positions``, in that order, when given)."""
        return [self.event(i) for i in (range(len(self.ids)) if positions is None else positions)]

    def take(self, n: int) -> FlowBatch:
        """The first ``n`` events (shares ``data``)."""
        if n >= len(self.ids):
            return self
        return FlowBatch(self.tenant, self.flow, self.ids[:n], self.data, self.ends[:n])


def flow_batch(
    tenant: str,
    flow: str,
    events: Sequence[Event],
    blobs: Sequence[bytes | bytearray] | None = None,
) -> FlowBatch:
    """Encode events of one flow (each event's ``tenant``/``flow`` must be these);
    ``blobs``, when given, are the events already msgpack'd."""
    if blobs is None:
        pack = _packer()
        blobs = [pack(e.to_wire()) for e in events]
    return FlowBatch(
        tenant, flow, [e.id for e in events], b"".join(blobs), [*accumulate(map(len, blobs))]
    )


def batches_of(
    events: Sequence[Event], packed: Sequence[bytes | bytearray] | None = None
) -> tuple[list[FlowBatch], list[int] | None]:
    """One batch per flow, flows in order of first appearance, each flow's events in input
    order; and ``order``: the input position of each event of the batches, concatenated
    (None when that is the input order: a host pushes one clock's read at a time, so its
    events already come in runs). ``packed[i]``, when given, is ``events[i]`` msgpack'd."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(events):
        group = groups.get((e.tenant, e.flow))
        if group is None:
            groups[(e.tenant, e.flow)] = [i]
        else:
            group.append(i)
    batches = [
        flow_batch(
            tenant,
            flow,
            [events[i] for i in group],
            None if packed is None else [packed[i] for i in group],
        )
        for (tenant, flow), group in groups.items()
    ]
    order = [i for group in groups.values() for i in group]
    return batches, (None if order == list(range(len(order))) else order)


def in_input_order(answers: list[T], order: list[int] | None) -> list[T]:
    """Per-event answers in batch order (see :func:`batches_of`) back in input order."""
    if order is None:
        return answers
    out = answers[:]
    for j, i in enumerate(order):
        out[i] = answers[j]
    return out


def pack_batches(batches: Sequence[FlowBatch]) -> bytes:
    return _packer()([[b.tenant, b.flow, b.ids, b.data, b.ends] for b in batches])


def unpack_batches(data: bytes) -> list[FlowBatch]:
    """Decode :func:`pack_batches`; malformed input raises :class:`EventError`."""
    try:
        rows: Any = msgpack.unpackb(data, raw=False, use_list=True)
        batches = [FlowBatch(*row) for row in rows]
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EventError(f"malformed claim batch: {exc}", reason="malformed") from exc
    for b in batches:
        if not isinstance(b.tenant, str) or not isinstance(b.flow, str):
            raise EventError(
                f"malformed claim batch: tenant and flow must be strings, not {b.tenant!r}/"
                f"{b.flow!r}",
                reason="malformed",
            )
        if len(b.ends) != len(b.ids) or (b.ends and b.ends[-1] != len(b.data)):
            raise EventError(
                f"malformed claim batch for {b.tenant}/{b.flow}: {len(b.ids)} ids, "
                f"{len(b.ends)} ends, {len(b.data)} bytes",
                reason="malformed",
            )
    return batches
