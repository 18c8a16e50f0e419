"""Resident memory of the study's processes over the soak, and its slope after warm-up: a leak shows as
a steady climb of a process that lives long enough (a restarted one starts a new series)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

WARMUP_FRACTION = 0.3   # the first 30 % of a series (and at least WARMUP_S) is warm-up: imports, first rounds
WARMUP_S = 60.0
MIN_SERIES_S = 60.0     # shorter series say nothing about a slope


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, by parent PID (from /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    return children


def tree_rss_bytes(root: int) -> int:
    """RSS of `root` and its descendants (a daemon and its worker; start.sh and the server)."""
    children = children_by_parent()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss_bytes(pid)
        todo.extend(children.get(pid, []))
    return total


@dataclass
class MemoryLog:
    series: dict[tuple[str, int], list[tuple[float, int]]] = field(default_factory=dict)

    def sample(self, pids: dict[str, int]) -> None:
        now = time.monotonic()
        for name, pid in pids.items():
            if (rss := tree_rss_bytes(pid)) > 0:
                self.series.setdefault((name, pid), []).append((now, rss))

    def slopes_kib_per_min(self) -> dict[str, float]:
        """Per participant, the least-squares slope of its longest-lived series after warm-up (KiB/min)."""
        best: dict[str, tuple[float, float]] = {}  # name -> (series duration, slope)
        for (name, _pid), points in self.series.items():
            if len(points) < 5 or points[-1][0] - points[0][0] < WARMUP_S + MIN_SERIES_S:
                continue
            start = points[0][0] + max(WARMUP_S, WARMUP_FRACTION * (points[-1][0] - points[0][0]))
            kept = [(t, r) for t, r in points if t >= start]
            if len(kept) < 3:
                continue
            slope = _slope(kept) * 60 / 1024
            duration = points[-1][0] - points[0][0]
            if name not in best or duration > best[name][0]:
                best[name] = (duration, slope)
        return {name: slope for name, (_d, slope) in best.items()}


def _slope(points: list[tuple[float, int]]) -> float:
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var else 0.0
