"""Tracked runs send their Prefect API writes a few at a time per worker; reads and flow
bodies are not held back (a SQLite Prefect server answers racing writes 503, retried 2 s
later by Prefect's client)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.prefect_runs import _gate_async_writes, _gate_sync_writes


@dataclass
class Request:
    method: str


@dataclass
class Recorder:
    """Stands in for the httpx client inside a Prefect client: counts sends in flight."""

    running: int = 0
    peak: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, method: str) -> None:
        with self.lock:
            self.running += 1
            self.peak[method] = max(self.peak.get(method, 0), self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


class SyncHttp(Recorder):
    def send(self, request: Request, *args: Any, **kwargs: Any) -> str:
        self.enter(request.method)
        time.sleep(0.02)
        self.leave()
        return f"{request.method} sent"


class AsyncHttp(Recorder):
    async def send(self, request: Request, *args: Any, **kwargs: Any) -> str:
        self.enter(request.method)
        await asyncio.sleep(0.02)
        self.leave()
        return f"{request.method} sent"


@dataclass
class Client:
    _client: Any


def test_sync_writes_go_through_the_slots_and_reads_do_not_wait() -> None:
    http = SyncHttp()
    client = Client(http)
    _gate_sync_writes(client, threading.BoundedSemaphore(2))
    with ThreadPoolExecutor(8) as pool:
        writes = list(pool.map(lambda _: client._client.send(Request("POST")), range(8)))
    assert writes == ["POST sent"] * 8
    assert http.peak["POST"] == 2
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client._client.send(Request("GET")), range(8)))
    assert http.peak["GET"] > 2


def test_a_write_that_fails_gives_its_slot_back() -> None:
    class Failing:
        def send(self, request: Request) -> None:
            raise ConnectionError("server gone")

    client = Client(Failing())
    slots = threading.BoundedSemaphore(1)
    _gate_sync_writes(client, slots)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            client._client.send(Request("PATCH"))
    assert slots.acquire(blocking=False)  # still free


async def test_async_writes_go_through_the_slots_and_reads_do_not_wait() -> None:
    http = AsyncHttp()
    client = Client(http)
    _gate_async_writes(client, asyncio.Semaphore(1))
    sends = [client._client.send(Request(m)) for m in ["POST", "PUT", "DELETE", "POST"]]
    assert await asyncio.gather(*sends) == ["POST sent", "PUT sent", "DELETE sent", "POST sent"]
    assert max(http.peak.values()) == 1
    await asyncio.gather(*(client._client.send(Request("GET")) for _ in range(6)))
    assert http.peak["GET"] == 6
