"""Group commit: calls made in the same event-loop turn share one ledger transaction.

At low load a call is flushed on the next loop turn, alone (no added wait); at high load every
run that starts or finishes while a transaction is being written joins the next one, so the
number of commits per second stays bounded however many runs complete. Adaptive batching with
no timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._flush_many = flush
        self._items: list[tuple[T, asyncio.Future[R]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._items:
            await asyncio.sleep(0)  # the rest of this loop turn joins the group
            items, self._items = self._items, []
            try:
                results = await self._flush_many([item for item, _ in items])
            except Exception as exc:
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(items, results, strict=True):
                if not future.done():
                    future.set_result(result)
