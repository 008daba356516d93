"""The processes of this benchmark's Ray session, read from /proc: memory and CPU per kind
(``ray::HostActor`` → ``HostActor``; Ray's own daemons by program name)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def session_pids(root: int | None = None) -> list[int]:
    """``root`` (this driver) and every descendant: GCS, raylet, Ray workers and actors."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        rss = int(statm[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0, 0
    pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
                break
    except OSError:
        pss = rss
    return rss, pss


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _comm(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return "?"
    return raw.decode(errors="replace") or "?"


def _role(cmd: str) -> str:
    """``ray::HostActor`` → ``HostActor``; Ray's own daemons by their program name."""
    if cmd.startswith("ray::"):
        return cmd.split()[0][5:].split(".")[0]  # ray::HostActor.ping → HostActor
    program = cmd.split()[0].rsplit("/", 1)[-1]
    if program.startswith("python"):
        script = next((a for a in cmd.split()[1:] if a.endswith(".py")), "")
        return script.rsplit("/", 1)[-1] or program
    return program


def memory_sample() -> dict[str, Any]:
    pids = session_pids()
    per = {pid: _rss_pss_kb(pid) for pid in pids}
    roles: dict[str, dict[str, float]] = {}
    for pid, (rss, _) in per.items():
        role = roles.setdefault(_role(_comm(pid)), {"n": 0, "rss_mb": 0.0})
        role["n"] += 1
        role["rss_mb"] = round(role["rss_mb"] + rss / 1024, 1)
    return {
        "processes": len(pids),
        "rss_mb": round(sum(r for r, _ in per.values()) / 1024, 1),
        "pss_mb": round(sum(p for _, p in per.values()) / 1024, 1),
        "by_role": dict(sorted(roles.items(), key=lambda kv: -kv[1]["rss_mb"])),
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Per process of the session: its kind (``_role``) and CPU seconds so far."""
    return {pid: (_role(_comm(pid)), _cpu_s(pid)) for pid in session_pids()}


def cpu_by_kind(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], window: float
) -> dict[str, float]:
    """CPU percent (of one core) each kind of process used between two ``cpu_seconds``."""
    kinds: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        used = max(0.0, cpu - before.get(pid, (kind, 0.0))[1])
        kinds[kind] = kinds.get(kind, 0.0) + used
    return {k: round(100 * v / window, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
