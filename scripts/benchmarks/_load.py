"""An open-loop HTTP load generator for the ingress: requests fire on schedule, many in flight.

A sequential client cannot keep 1,000 requests/s (each waits for the previous answer), and
it stalls the whole schedule on one slow answer. Here every request is its own task on one
asyncio loop: the schedule is kept whatever the answers do, and the achieved rate is reported.

At most ``max_connections`` requests are on the wire at once, spread over several small
httpx clients of ``PER_CLIENT`` connections each: one httpx pool's bookkeeping grows with
connections times queued requests, and a single client with 100+ connections becomes the
bottleneck itself (measured: 1,000/s offered, ~75/s achieved). A request that has to wait
for a slot is posted late, and its ``sent`` time is when it was really posted. The achieved
rate is measured over those times, and the worst lateness against the schedule is reported.

A request answered 503 (coordinator restarting) or failing in transport is retried with the
SAME event id and body, after the ``Retry-After`` the ingress gave (as a well-behaved webhook
sender does), until it is accepted (202), found a duplicate (200) or ``give_up_after`` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRYABLE = {502, 503, 504}
PER_CLIENT = 8  # connections per httpx client
TRANSPORT_RETRY_S = 0.2


@dataclass(slots=True)
class Request:
    """One event sent to the ingress and what became of it."""

    key: str
    due: float  # wall time the schedule wanted it posted
    sent: float = 0.0  # wall time of the first attempt (also in the body, as ``payload.sent``)
    status: int = 0  # final status; 0 = no final answer (gave up)
    answered: float = 0.0  # wall time of the final answer
    attempts: int = 0
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time, status); -1 transport


@dataclass
class LoadResult:
    requests: list[Request]

    @property
    def achieved_rate(self) -> float:
        sent = [r.sent for r in self.requests if r.sent]
        span = max(sent) - min(sent) if sent else 0.0
        return round((len(sent) - 1) / span, 1) if span > 0 else float("nan")

    @property
    def max_behind_s(self) -> float:
        """The worst lateness of a first POST against its schedule."""
        return max((r.sent - r.due for r in self.requests if r.sent), default=0.0)

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
    client: httpx.AsyncClient,
    slots: asyncio.Semaphore,
    url: str,
    req: Request,
    payload: Callable[[int, float], dict[str, Any]] | None,
    i: int,
    give_up_after: float,
) -> None:
    body: dict[str, Any] | None = None
    give_up = float("inf")
    while True:
        req.attempts += 1
        retry_in = TRANSPORT_RETRY_S
        async with slots:
            if body is None:  # the first attempt: stamp it now, when it really goes out
                req.sent = time.time()
                give_up = req.sent + give_up_after
                body_payload = payload(i, req.sent) if payload else {"key": req.key}
                body_payload.setdefault("sent", req.sent)
                body = {"id": req.key, "payload": body_payload}
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
    """POST ``{"id": "<tag>-<i>", "payload": {"key": ..., "sent": ...}}`` at ``rate``/s
    (``payload(i, sent)`` gives another payload; ``sent`` is added to it),
    ``n`` times or until ``stop`` is set; then wait for every answer (or give-up).
    ``into`` receives each request as it fires (for a caller watching a running load)."""
    if n is None and stop is None:
        raise ValueError("give n or stop")
    # This process holds Ray's driver and Prefect's modules: a full collection of that heap
    # takes ~120 ms on a slow 2-core machine, and one landing between a request's ``sent``
    # stamp and its bytes leaving would be charged to the cluster. Out of the collector's
    # reach it goes; the requests made from here on are still collected.
    gc.collect()
    gc.freeze()
    per = min(PER_CLIENT, max_connections)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    requests: list[Request] = into if into is not None else []
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_connections)
    interval = 1.0 / rate
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(timeout=timeout, limits=limits))
            for _ in range(-(-max_connections // per))
        ]
        t0, wall0 = time.perf_counter(), time.time()
        i = 0
        while (n is None or i < n) and not (stop is not None and stop.is_set()):
            delay = t0 + i * interval - time.perf_counter()
            # Always yield, even when behind: the requests must get the loop to go out.
            await asyncio.sleep(max(0.0, delay))
            req = Request(f"{tag}-{i}", due=wall0 + i * interval)
            requests.append(req)
            task = asyncio.create_task(
                _post_until_done(
                    clients[i % len(clients)], slots, url, req, payload, i, give_up_after
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)
    return LoadResult(requests)


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
