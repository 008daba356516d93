"""A worker's journal of the attempts it has begun, kept across its own restarts.

A coordinator that restarts re-sends the attempts the ledger shows ``running``. A live worker
joins the attempt in flight or returns its outcome; but a worker that was itself restarted
in between has forgotten both, and would run the same attempt's flow body a second time.
The journal remembers which attempts any incarnation began (one line appended before the
body starts; a write survives the process being killed): such an attempt is answered as
failed, so the coordinator retries it as a new attempt and no attempt ever runs twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEEP = 50_000  # attempts remembered: far more than can be in flight at a restart


class AttemptJournal:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.earlier: set[tuple[Any, ...]] = set()
        self._fh = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-KEEP:]
            for line in lines:
                try:
                    self.earlier.add(tuple(json.loads(line)))
                except (ValueError, TypeError):
                    continue  # a line torn by a kill mid-write
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.replace(path)
        self._fh = path.open("a", buffering=1)  # line-buffered: one write per attempt
        self._written = len(lines)

    def began_before(self, key: tuple[Any, ...]) -> bool:
        """True if an earlier incarnation of this worker began this attempt."""
        return key in self.earlier

    def begin(self, key: tuple[Any, ...]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(list(key)) + "\n")
        self._written += 1
        if self._written > 2 * KEEP:  # compact: keep the newest KEEP lines
            self._fh.close()
            assert self.path is not None
            lines = self.path.read_text(errors="replace").splitlines()[-KEEP:]
            self.path.write_text("".join(f"{line}\n" for line in lines))
            self._fh = self.path.open("a", buffering=1)
            self._written = len(lines)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
