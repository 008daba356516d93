"""Webhook clock: a passive clock whose events arrive through the cluster's HTTP ingress.

``POST /v1/events/{tenant}/{flow}`` (SPEC section 7) is served by the ingress, which validates
the body, derives the event id (the caller's ``id``, else a hash of the body) and hands the event
to the coordinator itself. This clock only marks the flow as listening for webhooks, so that
``status`` shows it and the ingress knows the flow accepts them; its ``batches`` never yields.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from actors.clocks import register
from actors.clocks.base import Batch, ClockSpec, CursorStore, EventClock

__all__ = ["WebhookClock"]


@register
class WebhookClock(EventClock):
    """Listens for ``POST /v1/events/{tenant}/{flow}``; takes no options (besides ``name``)."""

    type = "webhook"
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        self._closed = asyncio.Event()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)

    @property
    def source(self) -> str:
        return "webhook"

    async def batches(self) -> AsyncIterator[Batch]:
        self.set_listening()
        await self._closed.wait()  # set only by close(): events never come through here
        return
        yield Batch()  # unreachable; makes this an async generator like every other clock

    async def close(self) -> None:
        self._closed.set()
