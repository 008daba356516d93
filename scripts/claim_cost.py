"""Claim events into a fresh SQLite ledger in this process: a workload for instruction
counting, where wall-clock A/B runs are too noisy to see a 10-20% change.

    N=20000 valgrind --tool=callgrind python3.11 scripts/claim_cost.py [INDEX_TO_DROP ...]
    N=0     valgrind --tool=callgrind python3.11 scripts/claim_cost.py [INDEX_TO_DROP ...]

(Pass the real interpreter, not a pyenv shim.) Instructions per event = (total at N - total
at 0) / N. The events are shaped as in ``bare_claim_rate`` of
``scripts/benchmarks/throughput.py``: 16 flows, 1,000 events a transaction, each event
msgpack'd by the claim (the cluster path stores the bytes it received instead).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from actors.event import Event
from actors.ledger import SQLiteLedger

BATCH = 1000


async def claim_all(n: int, drop: list[str]) -> None:
    events = [
        Event(f"e{i}", "t", f"f{i % 16}", "bench://bare", "bench", "", {"n": i}) for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = SQLiteLedger(Path(tmp) / "claims.db")
        for index in drop:  # e.g. runs_pending, to see what one index costs
            ledger._db.execute(f'DROP INDEX "{index}"')
        for i in range(0, n, BATCH):
            await ledger.claim(events[i : i + BATCH])
        await ledger.close()


if __name__ == "__main__":
    asyncio.run(claim_all(int(os.environ.get("N", "20000")), sys.argv[1:]))
