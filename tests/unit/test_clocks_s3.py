"""S3Clock against moto's real HTTP server, driven through boto3 exactly as against AWS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, CursorStore
from actors.clocks.s3 import S3Clock, objects_to_emit


def fresh_bucket() -> str:
    return f"landing-{uuid.uuid4().hex[:12]}"


def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def make_clock(endpoint: str, bucket: str, cursor_path: Path, **options: Any) -> S3Clock:
    opts = {"bucket": bucket, "endpoint_url": endpoint, "poll_interval": 0.05, **options}
    spec = ClockSpec(tenant="acme", flow="ingest", name="landing", type="s3", options=opts)
    return S3Clock(spec, CursorStore(cursor_path))


@contextlib.asynccontextmanager
async def running(clock: S3Clock) -> AsyncIterator[AsyncIterator[Batch]]:
    await clock.open()
    batches = clock.batches()
    try:
        yield batches
    finally:
        await batches.aclose()
        await clock.close()


async def next_batch(batches: AsyncIterator[Batch], timeout: float = 10.0) -> Batch:
    return await asyncio.wait_for(anext(batches), timeout)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = fresh_bucket()
    s3(moto_endpoint).create_bucket(Bucket=name)
    return name


def test_s3_clock_is_registered_under_its_type() -> None:
    assert CLOCK_TYPES["s3"] is S3Clock


async def test_a_new_object_becomes_one_event_with_bucket_key_etag_and_size(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    put = s3(moto_endpoint).put_object(Bucket=bucket, Key="incoming/a.csv", Body=b"x,y\n1,2\n")
    etag = put["ETag"].strip('"')
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json", prefix="incoming/")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert clock.source == f"s3://{bucket}/incoming/"
    assert len(batch.events) == 1 and batch.rejections == []
    event = batch.events[0]
    assert event.id == f"{bucket}/incoming/a.csv@{etag}"
    assert event.type == "s3:ObjectCreated"
    assert event.payload["bucket"] == bucket
    assert event.payload["key"] == "incoming/a.csv"
    assert event.payload["etag"] == etag
    assert event.payload["size"] == 8
    assert event.occurred == event.payload["last_modified"]


async def test_acked_objects_are_not_emitted_again_after_a_restart(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    for key in ("a", "b", "c"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
    assert sorted(e.payload["key"] for e in first.events) == ["a", "b", "c"]

    client.put_object(Bucket=bucket, Key="marker", Body=b"m")
    restarted = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(restarted) as batches:
        second = await next_batch(batches)
    assert [e.payload["key"] for e in second.events] == ["marker"]


async def test_deleting_the_cursor_re_emits_the_same_event_ids(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    for key in ("a", "b"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
    clock.cursor.delete()

    again = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(again) as batches:
        second = await next_batch(batches)
    assert sorted(e.id for e in second.events) == sorted(e.id for e in first.events)
    assert len(second.events) == 2


async def test_an_overwritten_object_with_a_new_etag_is_a_new_event(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    client.put_object(Bucket=bucket, Key="report.json", Body=b'{"v": 1}')
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
        client.put_object(Bucket=bucket, Key="report.json", Body=b'{"v": 2}')
        second = await next_batch(batches)
    assert len(first.events) == 1 and len(second.events) == 1
    assert first.events[0].payload["key"] == second.events[0].payload["key"] == "report.json"
    assert first.events[0].id != second.events[0].id


async def test_unacked_objects_are_not_repeated_while_the_clock_runs(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    client.put_object(Bucket=bucket, Key="one", Body=b"1")
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        client.put_object(Bucket=bucket, Key="two", Body=b"2")
        second = await next_batch(batches)
    assert [e.payload["key"] for e in first.events] == ["one"]
    assert [e.payload["key"] for e in second.events] == ["two"]


async def test_prefix_and_suffix_select_which_keys_become_events(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    for key in ("in/a.json", "in/b.csv", "out/c.json", "in/sub/d.json"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json", prefix="in/", suffix=".json")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert sorted(e.payload["key"] for e in batch.events) == ["in/a.json", "in/sub/d.json"]


async def test_a_listing_over_many_pages_is_emitted_in_full(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3(moto_endpoint)
    for i in range(7):
        client.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
    clock = make_clock(moto_endpoint, bucket, tmp_path / "c.json", max_keys=2)
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert len(batch.events) == 7
    assert len({e.id for e in batch.events}) == 7


async def test_a_missing_bucket_degrades_the_clock_until_the_bucket_appears(
    moto_endpoint: str, tmp_path: Path
) -> None:
    name = fresh_bucket()
    clock = make_clock(moto_endpoint, name, tmp_path / "c.json")
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches, timeout=20))
        await wait_until(lambda: clock.state == "degraded")
        assert clock.error is not None and name in clock.error and "does not exist" in clock.error
        client = s3(moto_endpoint)
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="late", Body=b"x")
        batch = await pending
    assert clock.state == "listening" and clock.error is None
    assert [e.payload["key"] for e in batch.events] == ["late"]


async def test_an_unreachable_endpoint_degrades_the_clock_and_it_recovers(
    tmp_path: Path, moto_endpoint: str
) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    clock = make_clock(endpoint, fresh_bucket(), tmp_path / "c.json")
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches, timeout=30))
        await wait_until(lambda: clock.state == "degraded")
        assert clock.error is not None and endpoint in clock.error
        assert "testing" not in clock.error  # never the credentials
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            client = s3(endpoint)
            client.create_bucket(Bucket=clock.bucket)
            client.put_object(Bucket=clock.bucket, Key="after-outage", Body=b"x")
            batch = await pending
        finally:
            server.stop()
    assert [e.payload["key"] for e in batch.events] == ["after-outage"]
    assert clock.state == "listening"


def test_objects_to_emit_skips_keys_already_done_with_the_same_etag() -> None:
    listing = [
        {"Key": "a", "ETag": '"1"'},
        {"Key": "b", "ETag": '"2"'},
        {"Key": "c", "ETag": '"3"'},
    ]
    done = {"a": "1", "b": "old"}
    assert [o["Key"] for o in objects_to_emit(listing, done)] == ["b", "c"]
