"""Redis ledger: the SQLite ledger's records and transitions as Redis keys and Lua scripts.

Same semantics as :class:`~actors.ledger.sqlite.SQLiteLedger`, method for method; each call
is one Lua script (atomic). Keys live under ``{<name>}:``, one name per cluster (and per
coordinator shard), see :mod:`actors.ledger.target`; their layout is in
:mod:`actors.ledger.redis_lua`. Events are stored as the same msgpack blob.

Durability is the server's: a call returns once Redis has run its script, which is on disk
only if the server is configured so (``appendonly yes`` with ``appendfsync always``; with
``everysec`` the last second can be lost to a crash of the Redis host, and without
persistence a Redis restart loses the ledger). A ledger on a server without ``appendonly``
logs a warning when it connects.

One connection, opened on first use in the caller's event loop, without redis-py's own
retries. A write whose connection broke is sent once more, with the same token, on a new
connection: if the first one ran, the script answers what it answered then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import redis.exceptions

from actors.errors import LedgerError
from actors.event import Event
from actors.ledger import redis_lua
from actors.ledger.base import (
    EVENT_COUNTERS,
    ClaimsOfEvents,
    Finish,
    FlowCounts,
    GroupedStarts,
    RejectionRecord,
    RunRecord,
    RunState,
)
from actors.ledger.redis_target import META, client, connect_error, parse, prefix
from actors.ledger.target import Target

log = logging.getLogger(__name__)
Key = tuple[str, str, str]
MAX_REJECTIONS_KEPT = 10_000
_LOST = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def flow_key(tenant: str, flow: str) -> bytes:
    """``<len>:<tenant><len>:<flow>``: self-delimiting, so ``flow_key + id`` keys one run."""
    t, f = tenant.encode(), flow.encode()
    return b"%d:%s%d:%s" % (len(t), t, len(f), f)


def split_flow_key(data: bytes) -> tuple[str, str, bytes]:
    """``(tenant, flow, rest)`` of ``flow_key(tenant, flow) + rest``."""
    parts: list[bytes] = []
    for _ in range(2):
        colon = data.index(b":")
        n = int(data[:colon])
        parts.append(data[colon + 1 : colon + 1 + n])
        data = data[colon + 1 + n :]
    return parts[0].decode(), parts[1].decode(), data


def _pack(value: Any) -> bytes:
    """A stored blob: msgpack as the SQLite ledger stores it."""
    return msgpack.packb(value, use_bin_type=True)


def _script_args(value: Any) -> bytes:
    """Script arguments: Redis's ``cmsgpack`` reads no ``bin`` type, so bytes go as raw str."""
    return msgpack.packb(value, use_bin_type=False)


def _event(blob: bytes) -> Event:
    return Event.from_wire(msgpack.unpackb(blob, raw=False))


def _float(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _record(flat: list[bytes]) -> RunRecord:
    h = dict(zip(flat[::2], flat[1::2], strict=True))
    worker = h.get(b"wk")
    return RunRecord(
        event=_event(h[b"ev"]),
        state=RunState(h[b"st"].decode()),
        attempts=int(h[b"at"]),
        series=int(h[b"se"]),
        worker=None if worker is None else int(worker),
        next_at=_float(h.get(b"nx")),
        error=_text(h.get(b"er")),
        traceback=_text(h.get(b"tb")),
        prefect_flow_run_id=_text(h.get(b"fr")),
        created=float(h[b"cr"]),
        updated=float(h[b"up"]),
        batch=_text(h.get(b"ba")),
    )


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key_args(key: Key) -> list[bytes]:
    return [flow_key(key[0], key[1]), key[2].encode()]


class RedisLedger(ClaimsOfEvents, GroupedStarts):
    def __init__(self, url: str, state_dir: Path | str) -> None:
        self.target: Target = parse(url, state_dir)
        self.prefix = prefix(self.target.name)
        self._sources = redis_lua.scripts()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisLedger({self.target.safe_url!r}, prefix={self.prefix!r})"

    # -- connection ---------------------------------------------------------------------
    async def _connect(self) -> None:
        if self._closed:
            raise LedgerError(f"the ledger at {self.target.safe_url} is closed")
        if self._client is not None and self._loop is asyncio.get_running_loop():
            return
        await self._drop()
        r = client(self.target)
        try:
            await r.hsetnx(self.prefix + META, "version", 1)
            await self._check_persistence(r)
        except (*_LOST, redis.exceptions.RedisError) as exc:
            with contextlib.suppress(Exception):
                await r.aclose()
            raise connect_error(self.target, exc) from exc
        self._client, self._loop = r, asyncio.get_running_loop()
        self._scripts = {name: r.register_script(src) for name, src in self._sources.items()}

    async def _check_persistence(self, r: Any) -> None:
        try:
            reply = await r.config_get("appendonly")
        except redis.exceptions.ResponseError:  # CONFIG is disabled on managed servers
            return
        values = {_str(k): _str(v) for k, v in reply.items()}
        if values.get("appendonly") != "yes":
            log.warning(
                "the redis ledger at %s runs without appendonly: a Redis restart loses every "
                "claim (set appendonly yes, appendfsync always for durable claims)",
                self.target.safe_url,
            )

    async def _drop(self) -> None:
        r, self._client = self._client, None
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()

    async def _call(self, name: str, args: dict[str, Any]) -> Any:
        """Run one script. A write carries a token and is resent once, on a new connection,
        when the connection breaks; a read is simply asked again."""
        if name in redis_lua.WRITES:
            args = {**args, "token": uuid.uuid4().hex}
        packed = _script_args(args)
        for attempt in (1, 2):
            await self._connect()
            try:
                answer = await self._scripts[name](keys=[self.prefix], args=[packed])
            except _LOST as exc:
                await self._drop()
                if attempt == 2:
                    raise LedgerError(
                        f"lost the connection to the redis ledger at {self.target.safe_url} "
                        f"twice ({type(exc).__name__}: {exc}); the call may or may not have run"
                    ) from exc
                continue
            except redis.exceptions.RedisError as exc:
                raise LedgerError(
                    f"the redis ledger at {self.target.safe_url} ({self.prefix}) refused a "
                    f"call: {type(exc).__name__}: {exc}"
                ) from exc
            if name in redis_lua.WRITES:
                return msgpack.unpackb(answer, raw=True)
            return answer
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        await self._drop()

    # -- claims -------------------------------------------------------------------------
    async def claim(
        self, events: list[Event], packed: Sequence[bytes | bytearray] | None = None
    ) -> list[bool]:
        """Insert-if-absent, one script per batch: which events are new (repeats inside the
        batch are duplicates)."""
        if not events:
            return []
        first: dict[Key, int] = {}
        seen: dict[bytes, int] = {}
        for i, e in enumerate(events):
            first.setdefault(e.key, i)
            fk = flow_key(e.tenant, e.flow)
            seen[fk] = seen.get(fk, 0) + 1
        offered = [events[i] for i in first.values()]
        items = [
            [
                flow_key(e.tenant, e.flow),
                e.id.encode(),
                bytes(packed[i]) if packed else _pack(e.to_wire()),
                e.tenant,
                e.flow,
            ]
            for i, e in zip(first.values(), offered, strict=True)
        ]
        flows = [[fk, n] for fk, n in seen.items()]
        out = await self._call("claim", {"now": repr(time.time()), "items": items, "flows": flows})
        inserted = {e.key for e, new in zip(offered, out, strict=True) if new}
        return [first[e.key] == i and e.key in inserted for i, e in enumerate(events)]

    async def reject(self, records: list[RejectionRecord]) -> None:
        if not records:
            return
        now = time.time()
        items = [
            [
                flow_key(r.tenant, r.flow),
                r.reason,
                _pack([r.tenant, r.flow, r.source, r.reason, r.detail[:2000], r.ref, r.at or now]),
            ]
            for r in records
        ]
        await self._call("reject", {"items": items, "keep": MAX_REJECTIONS_KEPT})

    # -- run transitions ----------------------------------------------------------------
    async def _start(
        self, items: list[tuple[Key, int]], batch: str | None
    ) -> list[tuple[int, int] | None]:
        if not items:
            return []
        args = {
            "now": repr(time.time()),
            "batch": batch,
            "items": [[*_key_args(key), worker] for key, worker in items],
        }
        out = await self._call("start", args)
        return [None if r is False else (int(r[0]), int(r[1])) for r in out]

    async def finish(self, results: list[Finish]) -> list[bool]:
        if not results:
            return []
        items = []
        for r in results:
            state = (
                RunState.COMPLETED
                if r.ok
                else (RunState.FAILED if r.retry_at is not None else RunState.DEAD)
            )
            fk, event_id = _key_args(r.key)
            items.append(
                {
                    "fk": fk,
                    "id": event_id,
                    "attempt": r.attempt,
                    "state": state.value,
                    "er": r.error,
                    "tb": r.traceback,
                    "nx": None if r.retry_at is None else repr(float(r.retry_at)),
                    "fr": r.prefect_flow_run_id,
                }
            )
        done = await self._call("finish", {"now": repr(time.time()), "items": items})
        return [bool(x) for x in done]

    async def replay(self, keys: list[Key] | None) -> list[Event]:
        if keys == []:
            return []
        args: dict[str, Any] = {"now": repr(time.time())}
        if keys is None:
            args["all"] = True
        else:
            args["items"] = [_key_args(key) for key in dict.fromkeys(keys)]
        return [_event(blob) for blob in await self._call("replay", args)]

    # -- reads --------------------------------------------------------------------------
    async def open_runs(self, include_pending: bool = True) -> list[RunRecord]:
        states = ["pending", "running", "failed"] if include_pending else ["running", "failed"]
        records = [_record(r) for r in await self._call("open_runs", {"states": states})]
        records.sort(key=lambda r: (r.created, r.event.tenant, r.event.flow, r.event.id))
        return records

    async def pending(self, tenant: str, flow: str, limit: int) -> list[Event]:
        """The oldest ``limit`` events of a flow still waiting for their first start."""
        blobs = await self._call("pending", {"fk": flow_key(tenant, flow), "limit": limit})
        return [_event(b) for b in blobs]

    async def runs(
        self,
        tenant: str | None = None,
        flow: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        args: dict[str, Any] = {"t": tenant, "f": flow, "st": state, "limit": limit}
        if tenant is not None and flow is not None:
            args["fk"] = flow_key(tenant, flow)
        records = [_record(r) for r in await self._call("runs", args)]
        records.sort(key=lambda r: (-r.created, r.event.id))
        return records[: max(limit, 0)]

    async def counts(self) -> dict[tuple[str, str], FlowCounts]:
        counters, run_counts, flows = await self._call("counts", {})
        out: dict[tuple[str, str], FlowCounts] = {}
        for field, value in zip(counters[::2], counters[1::2], strict=True):
            tenant, flow, raw = split_flow_key(field)
            name = raw.decode()
            c = out.setdefault((tenant, flow), FlowCounts())
            if name in EVENT_COUNTERS:
                c.events[name] = int(value)
            elif name.startswith("rejected:"):
                c.rejected_by_reason[name.split(":", 1)[1]] = int(value)
        for field, value in zip(run_counts[::2], run_counts[1::2], strict=True):
            tenant, flow, raw = split_flow_key(field)
            out.setdefault((tenant, flow), FlowCounts()).runs[raw.decode()] = int(value)
        for field, value in zip(flows[::2], flows[1::2], strict=True):
            tenant, flow, _ = split_flow_key(field)
            out.setdefault((tenant, flow), FlowCounts()).last_event_at = _float(value)
        return out

    async def rejections(self, limit: int = 100) -> list[RejectionRecord]:
        if limit <= 0:
            return []
        blobs = await self._read(lambda r: r.lrange(self.prefix + "j", 0, limit - 1))
        return [RejectionRecord(*msgpack.unpackb(b, raw=False)) for b in blobs]

    async def _read(self, command: Any) -> Any:
        """One plain read command (no script): asked again once on a new connection."""
        for attempt in (1, 2):
            await self._connect()
            try:
                return await command(self._client)
            except _LOST as exc:
                await self._drop()
                if attempt == 2:
                    raise LedgerError(
                        f"lost the connection to the redis ledger at {self.target.safe_url} "
                        f"twice: {exc}"
                    ) from exc
            except redis.exceptions.RedisError as exc:
                raise LedgerError(
                    f"the redis ledger at {self.target.safe_url} refused a read: {exc}"
                ) from exc
        raise AssertionError("unreachable")

    # -- flow state ---------------------------------------------------------------------
    async def set_paused(self, tenant: str, flow: str, paused: bool) -> None:
        await self._call("set_paused", {"fk": flow_key(tenant, flow), "paused": paused})

    async def paused(self) -> set[tuple[str, str]]:
        members = await self._read(lambda r: r.smembers(self.prefix + "p"))
        return {split_flow_key(m)[:2] for m in members}
