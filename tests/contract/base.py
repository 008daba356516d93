"""The contract every connector meets, written once and run per connector against the real
service on loopback.

A connector's test module subclasses :class:`ClockContract` and provides a ``driver`` fixture
returning a :class:`SourceDriver`: how to create a fresh source (queue, stream, subject,
bucket, ...), publish good and malformed messages, and build the clock's options pointing at a
given host:port (the contract routes the clock through a :class:`TcpProxy` so it can cut the
connection). The suite proves, with the clock driven directly (no Ray):

- events arrive with stable ids and the published payloads;
- after ``ack`` and a restart the clock resumes from its cursor: nothing acked comes back;
- a batch received but never acked (the process was killed between receive and ack) comes back
  with the same ids, so the ledger turns it into duplicates: one run;
- a malformed message becomes a ``Rejection`` and is acked by policy: no poison loop;
- a source outage turns the clock ``degraded`` with a reason, and it recovers on its own,
  delivering what was published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, CursorStore, EventClock
from tests.contract.proxy import TcpProxy


def service_available(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def require_service(name: str, host: str, port: int) -> None:
    """Skip when the service is absent on a laptop; fail in CI, where it must be there."""
    if service_available(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must provide it; see DESIGN.md for how to start it)")
    pytest.skip(message)


class SourceDriver(ABC):
    """How the contract talks to one real service."""

    #: the clock ``type`` under test
    clock_type: str
    #: where the real service listens (the proxy forwards here)
    host: str = "127.0.0.1"
    port: int

    def __init__(self) -> None:
        self.name = f"contract-{uuid.uuid4().hex[:10]}"

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Create the fresh source (queue/stream/bucket ...) named ``self.name``."""

    async def teardown(self) -> None:  # noqa: B027 - optional hook
        """Delete it."""

    @abstractmethod
    def options(self, host: str, port: int) -> dict[str, Any]:
        """The clock's options, connecting to ``host:port`` (the proxy)."""

    @abstractmethod
    async def publish(self, payload: dict[str, Any]) -> None:
        """Publish one well-formed message carrying ``payload`` (directly, not via the proxy)."""

    @abstractmethod
    async def publish_malformed(self) -> None:
        """Publish one message the clock must reject (e.g. invalid JSON)."""

    def payload_of(self, event_payload: Any) -> dict[str, Any]:
        """The published payload inside an event's payload (connectors wrap it differently)."""
        return event_payload["body"]


class Harness:
    """Runs one clock instance and collects its batches."""

    def __init__(self, clock: EventClock) -> None:
        self.clock = clock
        self.batches: asyncio.Queue[Batch] = asyncio.Queue()
        self.unacked: list[Batch] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Harness:
        await self.clock.open()
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        async for batch in self.clock.batches():
            await self.batches.put(batch)

    async def take(self, events: int, rejections: int = 0, timeout: float = 20.0) -> Batch:
        """Collect batches until ``events`` events and ``rejections`` rejections arrived."""
        got = Batch()
        async with asyncio.timeout(timeout):
            while len(got.events) < events or len(got.rejections) < rejections:
                batch = await self.batches.get()
                self.unacked.append(batch)
                got.events += batch.events
                got.rejections += batch.rejections
        return got

    async def quiet(self, seconds: float) -> Batch:
        """Whatever arrives within ``seconds`` (to show that nothing does)."""
        got = Batch()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    batch = await self.batches.get()
                    self.unacked.append(batch)
                    got.events += batch.events
                    got.rejections += batch.rejections
        return got

    async def ack_all(self) -> None:
        for batch in self.unacked:
            await self.clock.ack(batch)
        self.unacked.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self.clock.close()


async def wait_state(clock: EventClock, state: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while clock.state != state:  # noqa: ASYNC110 - a plain attribute, no event to await
            await asyncio.sleep(0.05)


class ClockContract:
    """Inherit and provide a ``driver`` fixture (a set-up :class:`SourceDriver`)."""

    #: seconds to wait for a redelivery of unacked messages (visibility timeout, ack wait ...)
    redelivery_timeout: float = 30.0

    @pytest.fixture
    async def source(self, driver: SourceDriver) -> AsyncIterator[SourceDriver]:
        await driver.setup()
        try:
            yield driver
        finally:
            await driver.teardown()

    @pytest.fixture
    def proxy(self, driver: SourceDriver) -> Any:
        p = TcpProxy(driver.host, driver.port)
        yield p
        p.close()

    @pytest.fixture
    async def make_clock(
        self, source: SourceDriver, proxy: TcpProxy, tmp_path: Path
    ) -> AsyncIterator[Any]:
        harnesses: list[Harness] = []

        async def make() -> Harness:
            spec = ClockSpec(
                tenant="t",
                flow="f",
                name="contract",
                type=source.clock_type,
                options=source.options("127.0.0.1", proxy.port),
            )
            cls = CLOCK_TYPES[source.clock_type]
            h = await Harness(cls(spec, CursorStore.for_clock(tmp_path, spec))).start()
            harnesses.append(h)
            return h

        yield make
        for h in harnesses:
            await h.stop()

    # -- the contract -------------------------------------------------------------------
    async def test_events_arrive_with_stable_unique_ids_and_their_payloads(
        self, source: SourceDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        try:
            await wait_state(h.clock, "listening")
            for i in range(5):
                await source.publish({"n": i})
            got = await h.take(5)
            assert sorted(source.payload_of(e.payload)["n"] for e in got.events) == [0, 1, 2, 3, 4]
            assert len({e.id for e in got.events}) == 5
            assert all(e.id and e.occurred for e in got.events)
        finally:
            await h.stop()

    async def test_restart_after_ack_resumes_from_the_cursor(
        self, source: SourceDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        for i in range(3):
            await source.publish({"n": i})
        first = await h.take(3)
        await h.ack_all()
        await h.stop()
        for i in range(3, 5):
            await source.publish({"n": i})
        h2 = await make_clock()
        try:
            second = await h2.take(2)
            await h2.ack_all()
            assert sorted(source.payload_of(e.payload)["n"] for e in second.events) == [3, 4]
            assert not {e.id for e in first.events} & {e.id for e in second.events}
            assert (await h2.quiet(1.0)).events == []
        finally:
            await h2.stop()

    async def test_unacked_events_come_back_with_the_same_ids(
        self, source: SourceDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        for i in range(3):
            await source.publish({"n": i})
        first = await h.take(3)
        await h.stop()  # killed between receive and ack: nothing was acked
        h2 = await make_clock()
        try:
            again = await h2.take(3, timeout=self.redelivery_timeout)
            assert {e.id for e in again.events} == {e.id for e in first.events}
        finally:
            await h2.stop()

    async def test_malformed_message_is_rejected_and_not_redelivered(
        self, source: SourceDriver, make_clock: Any
    ) -> None:
        h = await make_clock()
        await wait_state(h.clock, "listening")
        await source.publish_malformed()
        await source.publish({"n": 1})
        got = await h.take(1, rejections=1)
        assert got.rejections[0].reason in ("malformed", "too_large")
        assert got.rejections[0].detail
        await h.ack_all()
        await h.stop()
        h2 = await make_clock()
        try:
            later = await h2.quiet(2.0)
            assert later.rejections == [] and later.events == []
        finally:
            await h2.stop()

    async def test_outage_degrades_the_clock_and_it_recovers_on_its_own(
        self, source: SourceDriver, make_clock: Any, proxy: TcpProxy
    ) -> None:
        h = await make_clock()
        try:
            await wait_state(h.clock, "listening")
            proxy.cut()
            await wait_state(h.clock, "degraded", timeout=60)
            assert h.clock.error
            await source.publish({"n": 42})
            proxy.restore()
            got = await h.take(1, timeout=90)
            assert source.payload_of(got.events[0].payload)["n"] == 42
            await wait_state(h.clock, "listening")
        finally:
            await h.stop()
