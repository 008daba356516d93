"""The fast lane between actors: answers by id, token guard, and WireDown whenever the caller
must make the call another way (nothing is half-done on the lane)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from actors.handles import RunOutcome
from actors.wire import (
    WireCallError,
    WireClient,
    WireDown,
    WireServed,
    encode,
    node_identity,
    read_frame,
)


class Echo(WireServed):
    WIRE_METHODS = frozenset({"echo", "slow", "boom", "outcome"})

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.release = asyncio.Event()

    async def echo(self, value: Any) -> Any:
        self.calls.append(value)
        return value

    async def slow(self, value: Any) -> Any:
        await self.release.wait()
        return value

    async def boom(self) -> None:
        raise ValueError("no such flow")

    async def outcome(self) -> RunOutcome:
        return RunOutcome(ok=True, prefect_flow_run_id="abc", started_at=1.5)

    async def secret(self) -> str:  # a method not listed in WIRE_METHODS
        return "never on the wire"


async def lane(target: Echo) -> WireClient:
    where = await target.wire_endpoint()
    assert where["node"] == node_identity()
    return WireClient(where["host"], where["port"], where["token"])


async def test_calls_travel_both_ways_with_their_values_intact() -> None:
    target = Echo()
    client = await lane(target)
    value = {"id": "e1", "payload": {"n": [1, 2.5, None, True]}, "raw": b"\x00\xff"}
    assert await client.call("echo", value) == value
    assert target.calls == [value]
    stats = await target.wire_stats()
    assert stats == {"served": 1, "links": 1}
    client.close()
    await target.close_wire()


async def test_concurrent_calls_share_one_link_and_each_gets_its_own_answer() -> None:
    target = Echo()
    client = await lane(target)
    slow = asyncio.ensure_future(client.call("slow", "late"))
    answers = await asyncio.gather(*(client.call("echo", i) for i in range(50)))
    assert answers == list(range(50))  # not held up behind the slow call
    assert not slow.done()
    target.release.set()
    assert await slow == "late"
    assert (await target.wire_stats())["links"] == 1
    client.close()
    await target.close_wire()


async def test_dataclass_answers_arrive_as_dicts_the_handle_can_rebuild() -> None:
    target = Echo()
    client = await lane(target)
    got = await client.call("outcome")
    assert RunOutcome.from_dict(got) == RunOutcome(
        ok=True, prefect_flow_run_id="abc", started_at=1.5
    )
    client.close()
    await target.close_wire()


async def test_an_exception_on_the_far_side_is_a_call_error_naming_it() -> None:
    target = Echo()
    client = await lane(target)
    with pytest.raises(WireCallError, match="ValueError: no such flow"):
        await client.call("boom")
    assert await client.call("echo", 1) == 1  # the link survives a failed call
    client.close()
    await target.close_wire()


async def test_methods_not_listed_are_refused() -> None:
    target = Echo()
    client = await lane(target)
    with pytest.raises(WireCallError, match="secret is not served"):
        await client.call("secret")
    client.close()
    await target.close_wire()


async def test_a_wrong_token_gets_the_link_dropped_and_nothing_runs() -> None:
    target = Echo()
    where = await target.wire_endpoint()
    intruder = WireClient(where["host"], where["port"], "not-the-token")
    with pytest.raises(WireDown):
        await asyncio.wait_for(intruder.call("echo", "x"), 5)
    assert target.calls == []
    await target.close_wire()


async def test_arguments_msgpack_cannot_carry_as_is_are_refused_before_sending() -> None:
    @dataclass
    class Rejection:
        reason: str

    target = Echo()
    client = await lane(target)
    with pytest.raises(WireDown, match="cannot travel"):
        await client.call("echo", [Rejection("bad")])
    with pytest.raises(WireDown, match="cannot travel"):
        await client.call("echo", 2**70)  # a JSON int beyond 64 bits
    assert target.calls == []
    assert await client.call("echo", "still fine") == "still fine"
    client.close()
    await target.close_wire()


async def test_calls_in_flight_when_the_server_goes_away_fail_with_wire_down() -> None:
    target = Echo()
    client = await lane(target)
    assert await client.call("echo", 1) == 1
    pending = asyncio.ensure_future(client.call("slow", 2))
    await asyncio.sleep(0.05)
    await target.close_wire()
    with pytest.raises(WireDown):
        await asyncio.wait_for(pending, 5)
    assert client.broken
    with pytest.raises(WireDown):  # a broken link stays broken: the caller asks anew
        await client.call("echo", 3)


async def test_connecting_to_nothing_is_wire_down() -> None:
    target = Echo()
    where = await target.wire_endpoint()
    await target.close_wire()
    client = WireClient(where["host"], where["port"], where["token"])
    with pytest.raises(WireDown, match="cannot connect"):
        await client.call("echo", 1)
    assert client.broken


async def test_a_server_restarted_serves_a_new_port_and_token() -> None:
    target = Echo()
    first = await target.wire_endpoint()
    assert await target.wire_endpoint() == first  # one server per actor
    await target.close_wire()
    second = await target.wire_endpoint()
    assert (second["port"], second["token"]) != (first["port"], first["token"])
    await target.close_wire()


async def test_oversized_or_garbage_frames_drop_the_link_without_running_anything() -> None:
    target = Echo()
    where = await target.wire_endpoint()
    reader, writer = await asyncio.open_connection(where["host"], where["port"])
    writer.write(encode(where["token"]))
    writer.write(encode(["not", "a call"]))  # two fields, not three
    await writer.drain()
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(read_frame(reader), 5)
    writer.close()
    assert target.calls == []
    await target.close_wire()


def test_a_link_is_only_used_on_the_event_loop_it_was_made_on() -> None:
    target = Echo()

    async def first() -> tuple[WireClient, dict[str, Any]]:
        where = await target.wire_endpoint()
        client = WireClient(where["host"], where["port"], where["token"])
        assert await client.call("echo", 1) == 1
        assert client.usable_here()
        return client, where

    loop = asyncio.new_event_loop()
    client, _ = loop.run_until_complete(first())

    async def elsewhere() -> None:
        assert not client.usable_here()
        with pytest.raises(WireDown, match="another event loop"):
            await client.call("echo", 2)

    asyncio.run(elsewhere())
    loop.run_until_complete(target.close_wire())
    loop.close()
