"""PostgreSQL clock: one event per new row of a table (an outbox), woken by LISTEN/NOTIFY.

The table is the truth: the clock reads rows with ``id > cursor`` in id order, ``max_batch`` at a
time, and saves the cursor (the last acked id) only in ``ack``. A notification on ``channel``
only wakes the read early; ``poll_interval`` is the safety net, so nothing published while the
clock was disconnected is missed.

Late commits: a sequence hands out ids at insert time, so a transaction holding id 5 can commit
after id 6 was committed and read. An id skipped by a read (a hole below a row that was read) is
watched for ``late_commit_window`` seconds: every read also asks for ``id = ANY(<holes>)``, and a
hole that turns into a row is delivered then. Holes that never fill (rolled-back inserts, deleted
rows) expire. Watched holes are saved with the cursor, so a restart keeps watching them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlsplit

import asyncpg

from actors.clocks import register
from actors.clocks.base import (
    Backoff,
    Batch,
    ClockSpec,
    CursorStore,
    EventClock,
    RawEvent,
    Rejection,
)
from actors.event import MAX_PAYLOAD_BYTES, utcnow_iso

__all__ = ["PostgresClock", "find_holes", "mask_dsn", "row_to_json"]

log = logging.getLogger(__name__)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
MIN_POLL = 0.05
MAX_HOLES = 1000  # holes watched at once; the newest are kept
MATCH = "__listener_match"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
#: numeric options: (name, lowest value, accepted types)
_NUMBERS = (
    ("poll_interval", MIN_POLL, (int, float)),
    ("late_commit_window", 0, (int, float)),
    ("max_batch", 1, int),
    ("max_bytes", 1, int),
)


class Unconvertible(ValueError):
    """A column value with no JSON form."""


class BadIdColumn(ValueError):
    """The id column does not hold integers (the cursor needs them)."""


_SOURCE_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL userinfo, ``password=`` parameters)."""
    masked = re.sub(r"(password=)[^&\s]*", r"\1***", dsn, flags=re.IGNORECASE)
    parts = urlsplit(masked)
    if parts.password is None:
        return masked
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def quote_ident(name: str) -> str:
    """A double-quoted identifier; ``schema.table`` quotes both parts."""
    return ".".join(f'"{part}"' for part in name.split("."))


def row_to_json(value: Any) -> Any:
    """A column value as JSON: datetime → ISO, Decimal/UUID → str, bytes → base64."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise Unconvertible(f"float {value!r} has no JSON form")
        return value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (Decimal, uuid.UUID)) or type(value).__module__ == "ipaddress":
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): row_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [row_to_json(v) for v in value]
    raise Unconvertible(f"a value of type {type(value).__name__} has no JSON form")


def find_holes(position: int | None, ids: Iterable[int], cap: int = MAX_HOLES) -> list[int]:
    """Ids a read skipped: holes before and between ``ids`` (ascending); the newest ``cap``."""
    holes: list[int] = []
    prev = position
    for i in ids:
        if prev is not None and i - prev > 1:
            holes.extend(range(max(prev + 1, i - cap), i))
        prev = i
    return holes[-cap:]


def parse_body(raw: Any) -> dict[str, Any]:
    """The JSON object held by a ``body_column`` value (text or already-decoded json/jsonb)."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise Unconvertible(f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise Unconvertible(f"body must be a JSON object, got {type(raw).__name__}")
    return raw


@register
class PostgresClock(EventClock):
    """Emits a ``postgres.row`` event per new row of ``table`` (options: docs/sources/postgres.md).

    The body is the row (``columns``, default all, converted to JSON) or the JSON object held by
    ``body_column``; ``where`` is a trusted SQL expression from the config, never user input.
    """

    type = "postgres"
    options: ClassVar[frozenset[str]] = frozenset(
        {"dsn", "table", "id_column", "channel", "poll_interval", "columns", "body_column",
         "where", "max_batch", "late_commit_window", "max_bytes"}
    )  # fmt: skip
    max_backoff: ClassVar[float] = 30.0

    def __init__(self, spec: ClockSpec, cursor: CursorStore) -> None:
        super().__init__(spec, cursor)
        self.check_options(spec.options)
        opts = spec.options
        self.dsn: str = opts.get("dsn") or DEFAULT_DSN
        self.table: str = opts["table"]
        self.id_column: str = opts.get("id_column", "id")
        self.channel: str | None = opts.get("channel")
        self.poll_interval = max(MIN_POLL, float(opts.get("poll_interval", 1.0)))
        self.columns: list[str] | None = opts.get("columns")
        self.body_column: str | None = opts.get("body_column")
        self.where: str | None = opts.get("where")
        self.max_batch = int(opts.get("max_batch", 500))
        self.late_window = float(opts.get("late_commit_window", 60.0))
        self.max_bytes = int(opts.get("max_bytes", MAX_PAYLOAD_BYTES))
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._position: int | None = None  # highest id read (in memory)
        self._acked: int | None = None  # highest id acked
        self._holes: dict[int, float] = {}  # skipped id -> when first seen (epoch seconds)
        self._pending_holes: set[int] = set()  # holes delivered, not yet acked
        self._inflight: set[int] = set()  # tail ids delivered, not yet acked
        self._sql = self._build_sql()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        table = options.get("table")
        if not isinstance(table, str) or not _TABLE.match(table):
            raise ValueError(f"option 'table' must be a table name or schema.table, got {table!r}")
        for key in ("id_column", "channel", "body_column"):
            value = options.get(key)
            if value is not None and (not isinstance(value, str) or not _IDENT.match(value)):
                raise ValueError(f"option {key!r} must be an identifier, got {value!r}")
        columns = options.get("columns")
        if columns is not None and options.get("body_column") is not None:
            raise ValueError("options 'columns' and 'body_column' exclude each other")
        if columns is not None and (
            not isinstance(columns, list)
            or not columns
            or not all(isinstance(c, str) and _IDENT.match(c) for c in columns)
        ):
            raise ValueError(f"option 'columns' must be a list of column names, got {columns!r}")
        dsn = options.get("dsn", DEFAULT_DSN)
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("option 'dsn' must be a postgresql:// URL")
        where = options.get("where", "true")
        if not isinstance(where, str) or not where.strip() or re.search(r";|--|/\*", where):
            raise ValueError(
                f"option 'where' must be one SQL expression (no ';' and no comments), got {where!r}"
            )
        for key, low, kind in _NUMBERS:
            value = options.get(key, low)
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                raise ValueError(f"option {key!r} must be a number >= {low}, got {value!r}")

    @property
    def source(self) -> str:
        return f"{mask_dsn(self.dsn)}#{self.table}"

    def _build_sql(self) -> str:
        key = quote_ident(self.id_column)
        if self.body_column:
            cols = f"{key}, {quote_ident(self.body_column)}"
        elif self.columns:
            cols = ", ".join(quote_ident(c) for c in dict.fromkeys([self.id_column, *self.columns]))
        else:
            cols = "*"
        match = f"coalesce(({self.where}), false)" if self.where else "true"
        return (
            f'SELECT {cols}, {match} AS "{MATCH}" FROM {quote_ident(self.table)} '
            f"WHERE {key} > $1::bigint OR {key} = ANY($2::bigint[]) ORDER BY {key} LIMIT $3"
        )

    async def open(self) -> None:
        saved = self.cursor.load() or {}
        last = saved.get("id")
        self._acked = self._position = last if isinstance(last, int) else None
        holes = saved.get("holes")
        if isinstance(holes, dict):
            self._holes = {int(k): float(v) for k, v in holes.items()}

    async def close(self) -> None:
        await self._drop_connection()

    async def ack(self, batch: Batch) -> None:
        token: dict[str, Any] = batch.token
        for i in token["holes"]:
            self._holes.pop(i, None)
            self._pending_holes.discard(i)
        self._inflight.difference_update(token["tail"])
        if token["top"] is not None:
            self._acked = max(self._acked if self._acked is not None else -(2**63), token["top"])
        saved = self._acked
        if saved is not None and self._inflight:
            saved = min(saved, min(self._inflight) - 1)  # an earlier batch is still unacked
        holes = {str(i): t for i, t in self._holes.items() if saved is not None and i <= saved}
        await asyncio.to_thread(self.cursor.save, {"id": saved, "holes": holes})

    async def batches(self) -> AsyncIterator[Batch]:
        backoff = Backoff(initial=min(1.0, self.poll_interval), cap=self.max_backoff)
        if self._inflight and self._acked is not None:  # a restarted iteration re-reads ...
            self._acked = min(self._acked, min(self._inflight) - 1)
        self._position = self._acked  # ... every unacked row
        self._inflight.clear()
        self._pending_holes.clear()
        while True:
            self._wake.clear()
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._connect()
                rows = await self._read()
                batch = self._batch(rows)
            except (*_SOURCE_ERRORS, BadIdColumn) as exc:
                await self._degrade(exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.set_listening()
            if len(batch):
                yield batch
            if len(rows) < self.max_batch:
                await self._sleep()

    async def _sleep(self) -> None:
        # Until a notification or a lost connection wakes us, at most poll_interval. Not
        # wait_for: before 3.12 it can swallow a cancellation that races the wake-up.
        timer = asyncio.get_running_loop().call_later(self.poll_interval, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _degrade(self, exc: BaseException) -> None:
        await self._drop_connection()
        reason = describe_error(exc, self.dsn, self.table)
        if self.state != "degraded":
            log.warning("postgres clock %s degraded: %s", self.spec.key, reason)
        self.set_degraded(reason)

    async def _connect(self) -> None:
        await self._drop_connection()
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            for kind in ("json", "jsonb"):
                await conn.set_type_codec(
                    kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )
            conn.add_termination_listener(lambda _conn: self._wake.set())
            if self.channel:
                await conn.add_listener(self.channel, lambda *_args: self._wake.set())
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()
            except asyncio.CancelledError:
                conn.terminate()
                raise

    async def _read(self) -> list[asyncpg.Record]:
        assert self._conn is not None
        if self.late_window:
            horizon = time.time() - self.late_window
            self._holes = {
                i: t for i, t in self._holes.items() if t >= horizon or i in self._pending_holes
            }
        watch = [i for i in self._holes if i not in self._pending_holes]
        low = self._position if self._position is not None else -(2**63)
        return await self._conn.fetch(self._sql, low, watch, self.max_batch, timeout=30)

    def _batch(self, rows: list[asyncpg.Record]) -> Batch:
        """Events for ``rows``; advances the in-memory position and the watched holes."""
        tail: list[int] = []
        batch = Batch(token={"holes": [], "tail": [], "top": None})
        for row in rows:
            key, matched = row[self.id_column], bool(row[MATCH])
            if not isinstance(key, int):
                raise BadIdColumn(f"id column {self.id_column!r} must be an integer column")
            if key in self._holes:  # a late commit
                if not matched:
                    del self._holes[key]
                    continue
                self._pending_holes.add(key)
                batch.token["holes"].append(key)
            elif self._position is None or key > self._position:
                tail.append(key)
                if not matched:
                    continue
                batch.token["tail"].append(key)
            else:
                continue  # below the position and no longer watched
            self._add(batch, key, row)
        if tail:
            self._watch_holes(find_holes(self._position, tail))
            self._position = batch.token["top"] = tail[-1]
            self._inflight.update(batch.token["tail"])
        return batch

    def _watch_holes(self, holes: list[int]) -> None:
        if not self.late_window or not holes:
            return
        now = time.time()
        self._holes.update(dict.fromkeys(holes, now))
        for hole in sorted(self._holes)[:-MAX_HOLES]:
            if hole not in self._pending_holes:
                del self._holes[hole]

    def _add(self, batch: Batch, key: int, row: asyncpg.Record) -> None:
        ref = f"{self.table}:{key}"
        try:
            if self.body_column:
                body = parse_body(row[self.body_column])
            else:
                body = {k: row_to_json(v) for k, v in row.items() if k != MATCH}
            size = len(json.dumps(body, allow_nan=False, separators=(",", ":")).encode())
        except (Unconvertible, ValueError) as exc:
            batch.rejections.append(Rejection("malformed", f"row {ref}: {exc}", ref))
            return
        if size > self.max_bytes:
            detail = f"row {ref} is {size} bytes as JSON, over max_bytes={self.max_bytes}"
            batch.rejections.append(Rejection("too_large", detail, ref))
            return
        payload = {"body": body, "table": self.table, "id": key}
        batch.events.append(RawEvent(ref, "postgres.row", utcnow_iso(), payload))


def describe_error(exc: BaseException, dsn: str, table: str) -> str:
    """A human reason for ``degraded``; the DSN's password is masked."""
    where = mask_dsn(dsn)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # bad password too
        return f"authentication to {where} failed: {exc}"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"table {table!r} does not exist at {where}"
    if isinstance(exc, asyncpg.PostgresError):
        return f"query on {table!r} at {where} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, BadIdColumn):
        return f"table {table!r}: {exc}"
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return f"cannot reach PostgreSQL at {where}: {type(exc).__name__}: {exc}".rstrip(": ")
    return f"PostgreSQL error at {where}: {type(exc).__name__}: {exc}"
