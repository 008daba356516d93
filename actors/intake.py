"""Intake: admission (quota, backpressure) and the durable claim of incoming events.

A host's batch arrives msgpack'd (``submit_packed``) as runs of one flow each
(:mod:`actors.claims`): event ids, and each event's own bytes, which the ledger stores as they
are, so an event is encoded once, by the host that read it, and decoded here only if it joins
a flow's in-memory queue. Outcomes per event: ``accepted``, ``duplicate``, ``throttled``/``busy``
(not stored: the host retries later) or ``rejected:<reason>``; every stored outcome is
answered only after the ledger transaction committed.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

from actors.claims import FlowBatch, batches_of, in_input_order, unpack_batches
from actors.event import Event
from actors.handles import SourceRejection
from actors.ledger import RejectionRecord
from actors.policy import TenantPolicy
from actors.quota import TokenBucket

FlowKey = tuple[str, str]


class Intake:
    """Mixin of :class:`actors.coordinator.Coordinator` (whose ``flows``, ``tenants``,
    ``_buckets``, ``_backlog``, ledger, queues and dispatcher it uses)."""

    async def submit_packed(self: Any, data: bytes, rejections: list[SourceRejection]) -> list[str]:
        """A host's batch as it crossed the wire (:func:`actors.claims.pack_batches`)."""
        return await self._admit(unpack_batches(data), rejections)

    async def submit(
        self: Any, events: list[Event], rejections: list[SourceRejection] | None = None
    ) -> list[str]:
        batches, order = batches_of(events)
        return in_input_order(await self._admit(batches, rejections), order)

    async def _admit(
        self: Any, batches: list[FlowBatch], rejections: list[SourceRejection] | None
    ) -> list[str]:
        """Claim what quotas and backlog allow; one outcome per event, in batch order."""
        await self.start()
        wanted: dict[str, int] = {}
        known = True
        for b in batches:
            if b.key in self.flows:
                wanted[b.tenant] = wanted.get(b.tenant, 0) + len(b.ids)
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
            claimed, tails = batches, [[] for _ in batches]
        else:
            claimed, tails = _ration(batches, self.flows, room, granted)
        news = await self.ledger.claim_batches([b for b in claimed if b.ids])
        outcomes: list[str] = []
        it = iter(news)
        for b, tail in zip(claimed, tails, strict=True):
            new = next(it) if b.ids else []
            outcomes += ["accepted" if x else "duplicate" for x in new]
            outcomes += tail
            if True in new:
                self._enqueue_new(b, [i for i, x in enumerate(new) if x])
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
    batches: list[FlowBatch],
    flows: Container[FlowKey],
    room: dict[str, int],
    granted: dict[str, int],
) -> tuple[list[FlowBatch], list[list[str]]]:
    """Per batch: the events that will be claimed (a prefix: a tenant's first ``granted``
    events, in order) and the outcomes of the rest (unknown flow, over the tenant's rate
    or backlog)."""
    claimed: list[FlowBatch] = []
    tails: list[list[str]] = []
    seen: dict[str, int] = {}
    for b in batches:
        n = len(b.ids)
        if b.key not in flows:
            claimed.append(b.take(0))
            tails.append(["rejected:unknown_flow"] * n)
            continue
        before = seen.get(b.tenant, 0)
        seen[b.tenant] = before + n
        take = max(0, min(n, granted[b.tenant] - before))
        throttled = max(0, min(n, room[b.tenant] - before) - take)
        claimed.append(b.take(take))
        tails.append(["throttled"] * throttled + ["busy"] * (n - take - throttled))
    return claimed, tails


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
