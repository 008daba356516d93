"""Intake: admission (quota, backpressure) and the durable claim of incoming events.

A host's batch arrives msgpack'd (``submit_packed``); each event's own bytes are sliced from
it as it is decoded and stored in the ledger as they are, so an event is encoded once, by the
host that read it. Outcomes per event: ``accepted``, ``duplicate``, ``throttled``/``busy``
(not stored: the host retries later) or ``rejected:<reason>``; every stored outcome is
answered only after the ledger transaction committed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Container
from typing import Any

from actors.event import Event, unpack_events_wire
from actors.handles import SourceRejection
from actors.ledger import RejectionRecord
from actors.policy import TenantPolicy
from actors.quota import TokenBucket

FlowKey = tuple[str, str]


class Intake:
    """Mixin of :class:`actors.coordinator.Coordinator` (whose ``flows``, ``tenants``,
    ``_buckets``, ``_backlog``, ledger, queues and dispatcher it uses)."""

    async def submit_packed(self: Any, data: bytes, rejections: list[SourceRejection]) -> list[str]:
        events, wire = unpack_events_wire(data)
        return await self._admit(events, rejections, wire)

    async def submit(
        self: Any, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        return await self._admit(events, rejections, None)

    async def _admit(
        self: Any,
        events: list[Event],
        rejections: list[SourceRejection] | None,
        wire: list[bytearray] | None,
    ) -> list[str]:
        await self.start()
        keys = [(ev.tenant, ev.flow) for ev in events]
        wanted: dict[str, int] = {}
        known = True
        for key, n in Counter(keys).items():
            if key in self.flows:
                wanted[key[0]] = wanted.get(key[0], 0) + n
            else:
                known = False
        # Workers saturated: a tenant whose backlog is full is told ``busy`` (the host keeps
        # the events unacked and reads its source more slowly; the ingress answers 429).
        # Checked per batch (a batch may overshoot the bound by its own size): duplicates,
        # which cost no backlog, are only known once claimed.
        room = {t: n if self._has_room(t) else 0 for t, n in wanted.items()}
        granted = {t: self._bucket(t).take(n) for t, n in room.items()}
        if rejections:
            await self.ledger.reject([_rejection_record(r) for r in rejections])
        if known and granted == wanted:  # the usual case: the whole batch, as it came
            outcomes: list[str] = [""] * len(events)
            to_claim: list[int] | range = range(len(events))
            new = await self.ledger.claim(events, wire)
        else:
            outcomes, to_claim = _ration(events, keys, self.flows, room, granted)
            packed = None if wire is None else [wire[i] for i in to_claim]
            new = await self.ledger.claim([events[i] for i in to_claim], packed)
        accepted: dict[FlowKey, list[Event]] = {}
        for i, is_new in zip(to_claim, new, strict=True):
            if is_new:
                outcomes[i] = "accepted"
                group = accepted.get(keys[i])
                if group is None:
                    group = accepted[keys[i]] = []
                group.append(events[i])
            else:
                outcomes[i] = "duplicate"
        for fkey, group in accepted.items():
            self._enqueue_many(fkey, group)
        self._pump()
        return outcomes

    def _has_room(self: Any, tenant: str) -> bool:
        policy = self.tenants.get(tenant) or TenantPolicy(tenant)
        return bool(self._backlog.get(tenant, 0) < policy.max_pending_runs)

    def _bucket(self: Any, tenant: str) -> TokenBucket:
        bucket: TokenBucket | None = self._buckets.get(tenant)
        if bucket is None:  # a tenant without a policy gets the default quota
            bucket = self._buckets[tenant] = TokenBucket(TenantPolicy(tenant).max_events_per_second)
        return bucket


def _ration(
    events: list[Event],
    keys: list[FlowKey],
    flows: Container[FlowKey],
    room: dict[str, int],
    granted: dict[str, int],
) -> tuple[list[str], list[int]]:
    """Outcomes of the events that will not be claimed (unknown flow, over the tenant's
    rate or backlog), and the positions of those that will, in order."""
    outcomes = [""] * len(events)
    to_claim: list[int] = []
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in flows:
            outcomes[i] = "rejected:unknown_flow"
            continue
        tenant = key[0]
        k = seen[tenant] = seen.get(tenant, 0) + 1
        if k <= granted[tenant]:
            to_claim.append(i)
        else:
            outcomes[i] = "throttled" if k <= room[tenant] else "busy"
    return outcomes, to_claim


def _rejection_record(r: SourceRejection) -> RejectionRecord:
    return RejectionRecord(
        tenant=r.tenant,
        flow=r.flow,
        source=r.source,
        reason=r.rejection.reason,
        detail=r.rejection.detail,
        ref=r.rejection.ref,
        at=time.time(),
    )
