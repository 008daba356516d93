"""Group commit: calls of one loop turn share one flush; errors reach every caller."""

from __future__ import annotations

import asyncio

from actors.group_commit import GroupCommit


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.flushes: list[list[int]] = []
        self.fail = fail

    async def flush(self, items: list[int]) -> list[int]:
        self.flushes.append(list(items))
        await asyncio.sleep(0.01)  # a transaction being written
        if self.fail:
            raise RuntimeError("disk full")
        return [i * 10 for i in items]


async def test_calls_in_one_turn_share_a_flush_and_get_their_own_result() -> None:
    rec = Recorder()
    group = GroupCommit(rec.flush)
    assert await asyncio.gather(*(group(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert rec.flushes == [[0, 1, 2, 3, 4]]


async def test_a_lone_call_is_flushed_alone_and_later_calls_join_the_next_group() -> None:
    rec = Recorder()
    group = GroupCommit(rec.flush)
    first = asyncio.create_task(group(1))
    await asyncio.sleep(0.001)  # the first flush is being written
    rest = [asyncio.create_task(group(i)) for i in (2, 3)]
    assert await first == 10
    assert [await t for t in rest] == [20, 30]
    assert rec.flushes == [[1], [2, 3]]


async def test_a_failed_flush_raises_in_every_caller_and_the_next_one_runs() -> None:
    rec = Recorder(fail=True)
    group = GroupCommit(rec.flush)
    results = await asyncio.gather(group(1), group(2), return_exceptions=True)
    assert [str(r) for r in results] == ["disk full", "disk full"]
    rec.fail = False
    assert await group(3) == 30
    assert rec.flushes == [[1, 2], [3]]
