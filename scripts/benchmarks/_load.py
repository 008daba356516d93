"""An open-loop HTTP load generator for the ingress: requests fire on schedule, many in flight.

A sequential client cannot keep 1,000 requests/s (each waits for the previous answer), and
it stalls the whole schedule on one slow answer. Here every request is its own task on one
asyncio loop: the schedule is kept whatever the answers do, and the achieved rate is reported.

A request answered 503 (coordinator restarting) or failing in transport is retried with the
SAME event id and body, after the ``Retry-After`` the ingress gave (as a well-behaved webhook
sender does), until it is accepted (202), found a duplicate (200) or ``give_up_after`` passes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRYABLE = {502, 503, 504}
TRANSPORT_RETRY_S = 0.2


@dataclass(slots=True)
class Request:
    """One event sent to the ingress and what became of it."""

    key: str
    sent: float  # wall time of the first attempt (also in the body, as ``payload.sent``)
    status: int = 0  # final status; 0 = no final answer (gave up)
    answered: float = 0.0  # wall time of the final answer
    attempts: int = 0
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time, status); -1 transport


@dataclass
class LoadResult:
    requests: list[Request]
    first_fire: float
    last_fire: float
    max_behind_s: float  # the worst lateness of a fire against its schedule

    @property
    def achieved_rate(self) -> float:
        span = self.last_fire - self.first_fire
        return round((len(self.requests) - 1) / span, 1) if span > 0 else float("nan")

    def summary(self, target_rate: float) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for r in self.requests:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        return {
            "target_rate_per_s": target_rate,
            "achieved_rate_per_s": self.achieved_rate,
            "max_behind_schedule_ms": round(self.max_behind_s * 1000, 1),
            "final_statuses": statuses,
            "retried": sum(1 for r in self.requests if r.attempts > 1),
        }


async def _post_until_done(
    client: httpx.AsyncClient, url: str, req: Request, body: dict[str, Any], give_up: float
) -> None:
    while True:
        req.attempts += 1
        retry_in = TRANSPORT_RETRY_S
        try:
            r = await client.post(url, json=body)
            status = r.status_code
            if status in RETRYABLE:
                try:
                    retry_in = float(r.headers.get("retry-after", TRANSPORT_RETRY_S))
                except ValueError:
                    retry_in = TRANSPORT_RETRY_S
        except httpx.HTTPError:
            status = -1
        now = time.time()
        req.answers.append((now, status))
        if status not in RETRYABLE and status != -1:
            req.status, req.answered = status, now
            return
        if now + retry_in > give_up:
            return
        await asyncio.sleep(retry_in)


async def fire(
    url: str,
    rate: float,
    *,
    n: int | None = None,
    stop: threading.Event | None = None,
    tag: str = "e",
    payload: Callable[[int, float], dict[str, Any]] | None = None,
    give_up_after: float = 60.0,
    max_connections: int = 256,
    timeout: float = 30.0,
    into: list[Request] | None = None,
) -> LoadResult:
    """POST ``{"id": "<tag>-<i>", "payload": {"key": ..., "sent": ...}}`` at ``rate``/s,
    ``n`` times or until ``stop`` is set; then wait for every answer (or give-up).
    ``into`` receives each request as it fires (for a caller watching a running load)."""
    if n is None and stop is None:
        raise ValueError("give n or stop")
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    requests: list[Request] = into if into is not None else []
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate
    behind = 0.0
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        first = last = time.time()
        i = 0
        while (n is None or i < n) and not (stop is not None and stop.is_set()):
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                behind = max(behind, -delay)
            key = f"{tag}-{i}"
            now = time.time()
            last = now
            if i == 0:
                first = now
            body_payload = payload(i, now) if payload else {"key": key, "sent": now}
            req = Request(key, now)
            requests.append(req)
            task = asyncio.create_task(
                _post_until_done(
                    client, url, req, {"id": key, "payload": body_payload}, now + give_up_after
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)
    return LoadResult(requests, first, last, behind)


class BackgroundLoad:
    """``fire`` on its own thread and loop until :meth:`stop` (for benchmarks that must do
    other things, such as killing processes, while the load runs)."""

    def __init__(self, url: str, rate: float, tag: str, **kw: Any) -> None:
        self._stop = threading.Event()
        self.result: LoadResult | None = None
        self.error: BaseException | None = None
        self.requests: list[Request] = []  # grows while the load runs

        def main() -> None:
            try:
                load = fire(url, rate, stop=self._stop, tag=tag, into=self.requests, **kw)
                self.result = asyncio.run(load)
            except BaseException as exc:  # reported by stop()
                self.error = exc

        self._thread = threading.Thread(target=main, name=f"load-{tag}", daemon=True)

    def start(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"load generator failed: {self.error!r}") from self.error
        if self.result is None:
            raise RuntimeError("load generator did not finish")
        return self.result
