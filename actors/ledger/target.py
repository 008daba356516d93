"""Where a networked ledger (PostgreSQL, Redis) keeps one cluster's data.

A ledger URL takes two query parameters of ours, removed before the URL reaches the driver:

- ``namespace=<name>``: the name of the ledger's data (a PostgreSQL schema, a Redis key prefix).
  Without it the name is ``listeners_<hash>``, the hash of the resolved state dir (the same
  hash that names the cluster's Ray namespace), so clusters with different state dirs share a
  server without seeing each other's event ids, and a cluster restarted on its state dir finds
  its ledger again.
- ``shard=<i>of<n>``: set by :func:`shard_url` for coordinator shard ``i`` of ``n``, whose data
  is named ``<namespace>_shard<i>of<n>`` (as SQLite shards live in ``ledger.shard<i>of<n>.db``
  beside ``ledger.db``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from actors.errors import LedgerError

T = TypeVar("T")
_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_SHARD = re.compile(r"^(\d+)of(\d+)$")
OURS = ("namespace", "shard")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (userinfo and ``password=`` parameters)."""
    masked = re.sub(r"(password=)[^&\s]*", r"\1***", url, flags=re.IGNORECASE)
    parts = urlsplit(masked)
    if parts.password is None:
        return masked
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def default_namespace(state_dir: Path | str) -> str:
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return f"listeners_{digest}"


@dataclass(frozen=True, slots=True)
class Target:
    dsn: str  # what the driver connects to (our parameters removed)
    namespace: str  # the base name (shard 0 of 1)
    shard: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The name of this shard's data: the namespace, with a shard suffix if sharded."""
        if self.shard is None:
            return self.namespace
        return f"{self.namespace}_shard{self.shard[0]}of{self.shard[1]}"

    @property
    def safe_url(self) -> str:
        return mask_url(self.dsn)

    def shard_pattern(self) -> re.Pattern[str]:
        """Matches the names of this namespace's shards; group 1 is their count."""
        return re.compile(rf"^{re.escape(self.namespace)}_shard\d+of(\d+)$")


def parse(url: str, state_dir: Path | str, schemes: tuple[str, ...]) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        raise LedgerError(f"not a {schemes[0]} ledger URL: {mask_url(url)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in OURS}
    rest = [(k, v) for k, v in query if k not in OURS]
    namespace = ours.get("namespace") or default_namespace(state_dir)
    if not _NAMESPACE.match(namespace):
        raise LedgerError(
            f"ledger namespace {namespace!r} in {mask_url(url)!r} is not a schema name: use "
            "1-40 lowercase letters, digits and underscores, not starting with a digit"
        )
    shard = None
    if "shard" in ours:
        m = _SHARD.match(ours["shard"])
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise LedgerError(f"bad shard {ours['shard']!r} in {mask_url(url)!r}")
        shard = (int(m.group(1)), int(m.group(2)))
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    return Target(dsn=dsn, namespace=namespace, shard=shard)


def shard_url(url: str, shard: int, shards: int) -> str:
    """The URL of coordinator shard ``shard`` of ``shards`` (unchanged for one shard)."""
    if shards <= 1:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "shard"]
    query.append(("shard", f"{shard}of{shards}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def shard_counts(target: Target, names: set[str]) -> set[int]:
    """The ``coordinator_shards`` values that wrote the data ``names`` of this namespace."""
    pattern = target.shard_pattern()
    found: set[int] = set()
    for name in names:
        if name == target.namespace:
            found.add(1)
        elif m := pattern.match(name):
            found.add(int(m.group(1)))
    return found


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ledger-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
