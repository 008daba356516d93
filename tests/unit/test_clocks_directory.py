"""DirectoryClock on a real folder: startup scan, watch notifications, rescans, rejections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from actors.clocks import CLOCK_TYPES, Batch, ClockSpec, CursorStore
from actors.clocks.directory import DirectoryClock, FileStat, Seen, files_to_emit


def make_clock(folder: Path, cursor_path: Path, **options: Any) -> DirectoryClock:
    opts = {"path": str(folder), "poll_interval": 0.2, **options}
    spec = ClockSpec(tenant="acme", flow="ingest", name="inbox", type="directory", options=opts)
    return DirectoryClock(spec, CursorStore(cursor_path))


@contextlib.asynccontextmanager
async def running(clock: DirectoryClock) -> AsyncIterator[AsyncIterator[Batch]]:
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


def names(batch: Batch) -> list[str]:
    return sorted(e.payload["name"] for e in batch.events)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_directory_clock_is_registered_under_its_type() -> None:
    assert CLOCK_TYPES["directory"] is DirectoryClock


async def test_a_new_file_becomes_one_event_with_id_path_size_mtime(
    inbox: Path, tmp_path: Path
) -> None:
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches))
        await wait_until(lambda: clock.state == "listening")
        target = inbox / "order.json"
        target.write_text('{"order": 7}')
        batch = await pending
    st = target.stat()
    assert clock.source == f"file://{inbox}"
    assert len(batch.events) == 1 and batch.rejections == []
    event = batch.events[0]
    assert event.id == f"{target}@{st.st_size}@{st.st_mtime_ns}"
    assert event.type == "file"
    assert event.payload == {
        "path": str(target),
        "name": "order.json",
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "content": {"order": 7},
    }


async def test_files_present_before_open_are_caught_up_in_one_batch(
    inbox: Path, tmp_path: Path
) -> None:
    for i in range(3):
        (inbox / f"f{i}.txt").write_text(str(i))
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert names(batch) == ["f0.txt", "f1.txt", "f2.txt"]
    assert all("content" not in e.payload for e in batch.events)  # auto: metadata only


async def test_a_malformed_json_file_is_rejected_and_a_later_good_file_still_arrives(
    inbox: Path, tmp_path: Path
) -> None:
    (inbox / "bad.json").write_text("{not json")
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
        (inbox / "good.json").write_text("[1, 2]")
        second = await next_batch(batches)
    assert first.events == [] and len(first.rejections) == 1
    rejection = first.rejections[0]
    assert rejection.reason == "malformed"
    assert rejection.ref == str(inbox / "bad.json") and "not valid JSON" in rejection.detail
    assert clock.state == "listening"
    assert names(second) == ["good.json"] and second.events[0].payload["content"] == [1, 2]


async def test_acked_files_and_rejections_are_not_emitted_again_after_a_restart(
    inbox: Path, tmp_path: Path
) -> None:
    (inbox / "a.json").write_text("{}")
    (inbox / "broken.json").write_text("{")
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
    assert len(first.events) == 1 and len(first.rejections) == 1

    (inbox / "marker.json").write_text("{}")
    restarted = make_clock(inbox, tmp_path / "c.json")
    async with running(restarted) as batches:
        second = await next_batch(batches)
    assert names(second) == ["marker.json"] and second.rejections == []


async def test_a_modified_file_is_a_new_event_with_a_new_id(inbox: Path, tmp_path: Path) -> None:
    target = inbox / "data.txt"
    target.write_text("v1")
    clock = make_clock(inbox, tmp_path / "c.json", format="text")
    async with running(clock) as batches:
        first = await next_batch(batches)
        await clock.ack(first)
        target.write_text("version 2")
        second = await next_batch(batches)
    assert [e.payload["content"] for e in first.events] == ["v1"]
    assert [e.payload["content"] for e in second.events] == ["version 2"]
    assert first.events[0].id != second.events[0].id


async def test_stable_ms_holds_a_growing_file_until_it_stops_changing(
    inbox: Path, tmp_path: Path
) -> None:
    target = inbox / "upload.bin"
    clock = make_clock(inbox, tmp_path / "c.json", stable_ms=400, poll_interval=0.05)
    writes_done = asyncio.Event()

    async def slow_writer() -> None:
        for _ in range(10):
            append(target, b"x" * 100)
            await asyncio.sleep(0.08)
        writes_done.set()

    async with running(clock) as batches:
        writer = asyncio.ensure_future(slow_writer())
        batch = await next_batch(batches)
        finished_first = writes_done.is_set()
        await writer
    assert finished_first, "the file was emitted while it was still growing"
    assert len(batch.events) == 1 and batch.events[0].payload["size"] == 1000


async def test_a_missing_directory_degrades_the_clock_until_it_appears(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    clock = make_clock(folder, tmp_path / "c.json")
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches))
        await wait_until(lambda: clock.state == "degraded")
        assert clock.error == f"directory {folder} does not exist"
        folder.mkdir()
        (folder / "first.txt").write_text("hi")
        batch = await pending
    assert clock.state == "listening"
    assert names(batch) == ["first.txt"]


async def test_a_file_over_max_bytes_is_rejected_as_too_large(inbox: Path, tmp_path: Path) -> None:
    (inbox / "big.json").write_text(json.dumps({"blob": "x" * 100}))
    clock = make_clock(inbox, tmp_path / "c.json", max_bytes=50)
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert batch.events == [] and [r.reason for r in batch.rejections] == ["too_large"]
    assert "limit is 50" in batch.rejections[0].detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_an_unreadable_file_is_rejected(inbox: Path, tmp_path: Path) -> None:
    target = inbox / "secret.json"
    target.write_text("{}")
    target.chmod(0)
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert batch.events == [] and [r.reason for r in batch.rejections] == ["unreadable"]


async def test_a_file_that_vanishes_before_it_is_read_is_rejected_as_unreadable(
    inbox: Path, tmp_path: Path
) -> None:
    clock = make_clock(inbox, tmp_path / "c.json", format="json")
    batch = clock._load([FileStat(str(inbox / "gone.json"), 10, 1)])
    assert batch.events == [] and [r.reason for r in batch.rejections] == ["unreadable"]
    assert batch.token == {str(inbox / "gone.json"): "10@1"}


async def test_pattern_skips_other_names_and_dotfiles(inbox: Path, tmp_path: Path) -> None:
    for name in ("a.json", "b.csv", ".tmp.json"):
        (inbox / name).write_text("{}")
    clock = make_clock(inbox, tmp_path / "c.json", pattern="*.json")
    async with running(clock) as batches:
        batch = await next_batch(batches)
    assert names(batch) == ["a.json"]


async def test_recursive_clocks_see_files_in_subfolders(inbox: Path, tmp_path: Path) -> None:
    (inbox / "top.txt").write_text("1")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "deep.txt").write_text("2")
    flat = make_clock(inbox, tmp_path / "flat.json")
    deep = make_clock(inbox, tmp_path / "deep.json", recursive=True)
    async with running(flat) as batches:
        flat_batch = await next_batch(batches)
    async with running(deep) as batches:
        deep_batch = await next_batch(batches)
    assert names(flat_batch) == ["top.txt"]
    assert names(deep_batch) == ["deep.txt", "top.txt"]


async def test_many_files_found_at_once_are_split_into_batches_of_at_most_1000(
    inbox: Path, tmp_path: Path
) -> None:
    for i in range(1500):
        (inbox / f"{i:04}.txt").write_text("")
    clock = make_clock(inbox, tmp_path / "c.json")
    async with running(clock) as batches:
        first = await next_batch(batches)
        second = await next_batch(batches)
    assert (len(first.events), len(second.events)) == (1000, 500)
    assert len({e.id for e in first.events + second.events}) == 1500


def test_files_to_emit_waits_for_an_unchanged_signature_when_stable_ms_is_set() -> None:
    young = 10_000_000_000  # mtime "now": too young to trust
    stat = FileStat("/in/a", 5, young)
    pending: dict[str, Seen] = {}
    assert files_to_emit([stat], {}, pending, 500, now=1.0, wall_ns=young) == []
    assert files_to_emit([stat], {}, pending, 500, now=1.2, wall_ns=young) == []
    assert files_to_emit([stat], {}, pending, 500, now=1.6, wall_ns=young) == [stat]
    assert pending == {}


def test_files_to_emit_skips_done_signatures_and_emits_old_files_at_once() -> None:
    old, changed = FileStat("/in/old", 1, 0), FileStat("/in/changed", 2, 0)
    done = {"/in/old": "1@0", "/in/changed": "1@0"}
    assert files_to_emit([old, changed], done, {}, 500, now=0.0, wall_ns=10**12) == [changed]


async def test_watch_notifications_deliver_a_file_long_before_the_next_rescan(
    inbox: Path, tmp_path: Path
) -> None:
    clock = make_clock(inbox, tmp_path / "c.json", poll_interval=60)
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches, timeout=5))
        await wait_until(lambda: clock.state == "listening")
        tmp = inbox / ".note.txt.part"
        tmp.write_text("hello")
        tmp.rename(inbox / "note.txt")
        batch = await pending
    assert names(batch) == ["note.txt"]


async def test_clocks_beyond_max_watchers_still_see_files_by_rescanning(
    inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DirectoryClock, "max_watchers", 0)
    clock = make_clock(inbox, tmp_path / "c.json", poll_interval=0.1)
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches))
        await wait_until(lambda: clock.state == "listening")
        (inbox / "polled.txt").write_text("x")
        batch = await pending
    assert names(batch) == ["polled.txt"]
    assert DirectoryClock._watchers == 0


async def test_a_directory_removed_while_listening_degrades_and_recovers(
    inbox: Path, tmp_path: Path
) -> None:
    clock = make_clock(inbox, tmp_path / "c.json", poll_interval=0.05)
    async with running(clock) as batches:
        pending = asyncio.ensure_future(next_batch(batches))
        await wait_until(lambda: clock.state == "listening")
        os.rmdir(inbox)
        await wait_until(lambda: clock.state == "degraded")
        os.mkdir(inbox)
        (inbox / "back.txt").write_text("x")
        batch = await pending
    assert clock.state == "listening"
    assert names(batch) == ["back.txt"]


async def test_create_option_makes_the_missing_folder_and_listens(tmp_path: Path) -> None:
    from actors.clocks import ClockSpec, CursorStore
    from actors.clocks.directory import DirectoryClock

    folder = tmp_path / "not" / "yet"
    spec = ClockSpec("t", "f", "d", "directory", {"path": str(folder), "create": True})
    clock = DirectoryClock(spec, CursorStore.for_clock(tmp_path / "state", spec))
    await clock.open()
    assert folder.is_dir()
