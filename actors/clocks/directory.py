"""Directory clock: one event per new or changed file in a folder.

Three ways to notice a file, all funnelled into the same decision: a scan when the clock starts
(files that arrived while it was down), ``watchfiles`` notifications (fast path), and a full
rescan every ``poll_interval`` seconds (safety net for lost notifications, network filesystems,
exhausted inotify limits). Which files to emit is a pure function of what is on disk and what the
cursor already holds; the event id ``<path>@<size>@<mtime_ns>`` changes when the file does.

Like a shell glob, ``pattern`` does not match names that start with a dot, so the usual
"write ``.name.tmp`` then rename" protocol never emits half-written files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from watchfiles import awatch

from actors.clocks import register
from actors.clocks.base import (
    Backoff,
    Batch,
    ClockSpec,
    CursorStore,
    EventClock,
    RawEvent,
    Rejection,
    wait_event,
)
from actors.event import MAX_PAYLOAD_BYTES, iso

__all__ = ["DirectoryClock", "FileStat", "files_to_emit"]

log = logging.getLogger(__name__)

FORMATS = ("auto", "json", "text", "none")
BATCH_CAP = 1000


@dataclass(frozen=True, slots=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int

    @property
    def signature(self) -> str:
        return f"{self.size}@{self.mtime_ns}"


@dataclass(slots=True)
class Seen:
    """A file whose signature the clock is waiting on to stay unchanged for ``stable_ms``."""

    signature: str
    since: float  # time.monotonic() when this signature was first observed


def files_to_emit(
    stats: Iterable[FileStat],
    done: dict[str, str],
    pending: dict[str, Seen],
    stable_ms: int,
    now: float,
    wall_ns: int,
) -> list[FileStat]:
    """Files to emit now: not in ``done`` (acked or in flight) with this signature, and stable.

    A file is stable when its mtime is ``stable_ms`` old, or when the clock has seen the same
    size and mtime for ``stable_ms``. ``pending`` (path → first sighting) is updated in place.
    """
    ready: list[FileStat] = []
    for st in stats:
        if done.get(st.path) == st.signature:
            pending.pop(st.path, None)
            continue
        if stable_ms > 0 and wall_ns - st.mtime_ns < stable_ms * 1_000_000:
            seen = pending.get(st.path)
            if seen is None or seen.signature != st.signature:
                pending[st.path] = Seen(st.signature, now)
                continue
            if (now - seen.since) * 1000 < stable_ms:
                continue
        pending.pop(st.path, None)
        ready.append(st)
    return ready


@register
class DirectoryClock(EventClock):
    """Emits a ``file`` event for every file in ``path`` matching ``pattern``.

    Options: ``path`` (required), ``pattern`` (glob, default ``*``), ``recursive`` (default false),
    ``format`` (``auto``: parse ``*.json``, else metadata only; ``json``; ``text``; ``none``),
    ``poll_interval`` (seconds between safety-net rescans, default 1.0), ``stable_ms`` (a file
    must keep its size and mtime this long before it is emitted, default 0), ``max_bytes``
    (largest file whose content is read, default 1 MiB), ``create`` (create the folder when it
    is missing instead of waiting for it, degraded; default false).
    """

    type = "directory"
    options: ClassVar[frozenset[str]] = frozenset(
        {
            "path",
            "pattern",
            "recursive",
            "format",
            "poll_interval",
            "stable_ms",
            "max_bytes",
            "create",
        }
    )
    #: clocks per process that use filesystem notifications (the others rely on rescans)
    max_watchers: ClassVar[int] = 16
    _watchers: ClassVar[int] = 0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.directory = Path(os.path.abspath(os.fspath(opts["path"])))
        self.pattern: str = opts.get("pattern", "*")
        self.recursive: bool = bool(opts.get("recursive", False))
        self.format: str = opts.get("format", "auto")
        self.poll_interval = float(opts.get("poll_interval", 1.0))
        self.stable_ms = int(opts.get("stable_ms", 0))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self.create: bool = bool(opts.get("create", False))
        self._acked: dict[str, str] = {}  # path -> signature, persisted in ack
        self._inflight: dict[str, str] = {}  # yielded, not yet acked
        self._pending: dict[str, Seen] = {}
        self._changed: set[str] = set()
        self._wake = asyncio.Event()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        path = options.get("path")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError("a directory clock needs option 'path' (the folder to watch)")
        if not isinstance(options.get("pattern", "*"), str) or not options.get("pattern", "*"):
            raise ValueError(f"option 'pattern' must be a glob string, got {options['pattern']!r}")
        if not isinstance(options.get("recursive", False), bool):
            got = options["recursive"]
            raise ValueError(f"option 'recursive' must be true or false, got {got!r}")
        if not isinstance(options.get("create", False), bool):
            raise ValueError(f"option 'create' must be true or false, got {options['create']!r}")
        if options.get("format", "auto") not in FORMATS:
            raise ValueError(f"option 'format' must be one of {FORMATS}, got {options['format']!r}")
        _check_number(options, "poll_interval", minimum=0.01)
        _check_number(options, "stable_ms", minimum=0, integer=True)
        _check_number(options, "max_bytes", minimum=1, integer=True)

    @property
    def source(self) -> str:
        return f"file://{self.directory}"

    async def open(self) -> None:
        if self.create:
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        saved = self.cursor.load() or {}
        files = saved.get("files")
        self._acked = {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}

    async def ack(self, batch: Batch) -> None:
        for path, signature in batch.token.items():
            self._acked[path] = signature
            if self._inflight.get(path) == signature:
                del self._inflight[path]
        await asyncio.to_thread(self.cursor.save, {"files": dict(self._acked)})

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=min(self.poll_interval, 1.0), cap=30.0)
        while True:
            if not await asyncio.to_thread(self.directory.is_dir):
                self.set_degraded(f"directory {self.directory} does not exist")
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            watcher = asyncio.create_task(self._watch(), name=f"watch {self.directory}")
            await asyncio.sleep(0)  # the watcher's first step sets up its watches
            self.set_listening()
            try:
                async for batch in self._listen():
                    yield batch
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _listen(self) -> AsyncIterator[Batch]:
        """Emit batches until the directory disappears (then return, to degrade and retry)."""
        next_full = 0.0
        while True:
            now = time.monotonic()
            changed, self._changed = self._changed, set()
            if now >= next_full:
                try:
                    stats = await asyncio.to_thread(self._scan)
                except OSError as exc:  # the directory vanished or became unreadable
                    log.warning("directory clock %s: rescan failed: %s", self.spec.key, exc)
                    return
                self._prune({st.path for st in stats})
                next_full = now + self.poll_interval
            else:
                stats = await asyncio.to_thread(self._stat_paths, changed | set(self._pending))
                self._prune({st.path for st in stats}, tables=(self._pending,))
            done = {**self._acked, **self._inflight}
            ready = files_to_emit(stats, done, self._pending, self.stable_ms, now, time.time_ns())
            for start in range(0, len(ready), BATCH_CAP):
                batch = await asyncio.to_thread(self._load, ready[start : start + BATCH_CAP])
                self._inflight.update(batch.token)
                yield batch
            await self._sleep(next_full)

    async def _sleep(self, next_full: float) -> None:
        """Wait for a notification, the next rescan, or the next stability check."""
        deadline = next_full
        if self._pending:
            first = min(seen.since for seen in self._pending.values())
            deadline = min(deadline, first + self.stable_ms / 1000)
        timeout = max(0.0, deadline - time.monotonic())
        if not self._changed:
            self._wake.clear()
            await wait_event(self._wake, timeout)

    async def _watch(self) -> None:
        """Feed ``watchfiles`` notifications into ``_changed``; rescans cover any failure.

        Each watcher holds an inotify instance (128 per user by default) and one of anyio's 40
        worker threads, so at most ``max_watchers`` clocks per process watch; the rest poll.
        """
        if DirectoryClock._watchers >= self.max_watchers:
            log.info("directory clock %s: %d watchers busy, polling", self.spec.key, self._watchers)
            return
        DirectoryClock._watchers += 1
        try:
            async for changes in awatch(
                self.directory, watch_filter=None, recursive=self.recursive, step=20, debounce=500
            ):
                self._changed.update(self._accept(path) for _, path in changes)
                self._changed.discard("")
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # inotify limits, the directory removed, ...
            log.warning("directory clock %s: watcher stopped (%s), polling", self.spec.key, exc)
        finally:
            DirectoryClock._watchers -= 1

    def _accept(self, path: str) -> str:
        """``path`` normalised under the directory if it matches the pattern, else ``""``."""
        rel = os.path.relpath(path, self.directory)
        if rel.startswith(".." + os.sep) or rel in ("..", "."):
            return ""
        if not self.recursive and os.sep in rel:
            return ""
        return os.path.join(self.directory, rel) if self._matches(rel) else ""

    def _matches(self, rel: str) -> bool:
        name = os.path.basename(rel)
        if name.startswith(".") and not self.pattern.startswith("."):
            return False
        target = rel.replace(os.sep, "/") if "/" in self.pattern else name
        return fnmatch.fnmatchcase(target, self.pattern)

    def _scan(self) -> list[FileStat]:
        """Every matching regular file; raises ``OSError`` if the directory itself is gone."""
        out: list[FileStat] = []
        pending = [str(self.directory)]
        while pending:
            folder = pending.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                if folder == str(self.directory):
                    raise
                continue
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        if self.recursive and not entry.name.startswith("."):
                            pending.append(entry.path)
                    elif entry.is_file() and self._matches(
                        os.path.relpath(entry.path, self.directory)
                    ):
                        st = entry.stat()
                        out.append(FileStat(entry.path, st.st_size, st.st_mtime_ns))
        return out

    def _stat_paths(self, paths: Iterable[str]) -> list[FileStat]:
        out: list[FileStat] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:  # gone again: nothing to emit
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(FileStat(path, st.st_size, st.st_mtime_ns))
        return out

    def _prune(self, present: set[str], tables: tuple[dict[str, Any], ...] = ()) -> None:
        """Forget files no longer ``present`` (the cursor is saved with the next ack)."""
        for table in tables or (self._acked, self._pending):
            for path in [p for p in table if p not in present]:
                del table[path]

    def _load(self, files: list[FileStat]) -> Batch:
        batch = Batch(token={})
        for st in files:
            item = self._to_event(st)
            if isinstance(item, Rejection):
                batch.rejections.append(item)
            else:
                batch.events.append(item)
            batch.token[st.path] = st.signature
        return batch

    def _to_event(self, st: FileStat) -> RawEvent | Rejection:
        payload: dict[str, Any] = {
            "path": st.path,
            "name": os.path.basename(st.path),
            "size": st.size,
            "mtime_ns": st.mtime_ns,
        }
        fmt = self.format
        if fmt == "auto":
            fmt = "json" if st.path.endswith(".json") else "none"
        if fmt != "none":
            content = self._read(st, fmt)
            if isinstance(content, Rejection):
                return content
            payload["content"] = content
        occurred = datetime.fromtimestamp(st.mtime_ns / 1e9, tz=UTC)
        return RawEvent(
            id=f"{st.path}@{st.signature}", type="file", occurred=iso(occurred), payload=payload
        )

    def _read(self, st: FileStat, fmt: str) -> Any:
        """The parsed content of a file, or a :class:`Rejection` saying why there is none."""
        if st.size > self.max_bytes:
            detail = f"{st.path} is {st.size} bytes, the limit is {self.max_bytes}"
            return Rejection(reason="too_large", detail=detail, ref=st.path)
        try:
            with open(st.path, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except OSError as exc:
            detail = f"cannot read {st.path}: {exc.strerror or exc}"
            return Rejection(reason="unreadable", detail=detail, ref=st.path)
        if len(data) > self.max_bytes:
            detail = f"{st.path} grew past the limit of {self.max_bytes} bytes"
            return Rejection(reason="too_large", detail=detail, ref=st.path)
        try:
            text = data.decode("utf-8")
            return json.loads(text) if fmt == "json" else text
        except UnicodeDecodeError as exc:
            detail = f"{st.path} is not UTF-8 text: {exc}"
            return Rejection(reason="malformed", detail=detail, ref=st.path)
        except json.JSONDecodeError as exc:
            detail = f"{st.path} is not valid JSON: {exc}"
            return Rejection(reason="malformed", detail=detail, ref=st.path)


def _check_number(
    options: dict[str, Any], key: str, *, minimum: float, integer: bool = False
) -> None:
    if key not in options:
        return
    value = options[key]
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ValueError(f"option {key!r} must be {what} >= {minimum:g}, got {value!r}")
