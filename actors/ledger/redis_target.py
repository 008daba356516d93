"""Where a Redis ledger lives: its keys share the prefix ``{<name>}:``, where ``<name>`` is the
ledger's namespace (see :mod:`actors.ledger.target`), one name per coordinator shard. The
braces are a hash tag, so a ledger's keys would share one slot; the ledger talks to a single
Redis server (redis-py's plain client), not to a Redis Cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from actors.errors import LedgerError
from actors.ledger.target import Target
from actors.ledger.target import parse as parse_target

SCHEMES = ("redis", "rediss")
INSTALL_HINT = "pip install 'listener-cluster[redis]'"
META = "meta"  # the key that marks a written ledger: {<name>}:meta

__all__ = ["INSTALL_HINT", "SCHEMES", "client", "is_redis_url", "ledger_names", "parse", "prefix"]


def is_redis_url(url: str) -> bool:
    return urlsplit(url).scheme in SCHEMES


def parse(url: str, state_dir: Path | str) -> Target:
    return parse_target(url, state_dir, SCHEMES)


def prefix(name: str) -> str:
    return f"{{{name}}}:"


def client(target: Target) -> Any:
    """A redis-py asyncio client on one connection, without redis-py's own retries: a command
    whose connection broke may have run, and the ledger must decide what to do about that."""
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:  # pragma: no cover - the redis extra is not installed
        raise LedgerError(
            f"the redis ledger needs redis-py, which is not installed: {INSTALL_HINT}"
        ) from exc
    return Redis.from_url(
        target.dsn,
        single_connection_client=True,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=10,
        socket_timeout=60,
        client_name="listener-cluster-ledger",
    )


def connect_error(target: Target, exc: BaseException) -> LedgerError:
    reason = str(exc).replace(target.dsn, target.safe_url) or type(exc).__name__
    return LedgerError(f"cannot connect to the redis ledger at {target.safe_url}: {reason}")


async def ledger_names(target: Target) -> set[str]:
    """The names of this ledger's data (the base one and its shards') that were written.
    Connecting checks the server answers."""
    import redis.exceptions

    r = client(target)
    try:
        names: set[str] = set()
        if await r.exists(prefix(target.namespace) + META):
            names.add(target.namespace)
        pattern = prefix(f"{target.namespace}_shard*of*") + META
        async for key in r.scan_iter(match=pattern, count=1000):
            names.add(key.decode().split("}", 1)[0].lstrip("{"))
        return names
    except (OSError, redis.exceptions.RedisError) as exc:
        raise connect_error(target, exc) from exc
    finally:
        await r.aclose()
