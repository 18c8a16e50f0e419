"""Peak memory and CPU of process trees, read from /proc (Linux), for the benchmarks, and the thread that
samples them while a study runs."""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Periodic:
    """`sample()` every `interval_s` in a thread, from entering the `with` block to leaving it, and once more
    on each side (a process that ends within an interval is still seen once). Subclasses define `sample`."""

    def __init__(self, interval_s: float):
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def machine_busy_s() -> float:
    """CPU-seconds all cores of this machine have been busy since boot (/proc/stat: every state but idle
    and iowait), whoever ran: a study's processes, the benchmark's own, anything else on the machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most resident memory the process ever held."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shared_memory_split(pid: int) -> dict[str, int]:
    """Resident bytes as the kernel splits them between processes (/proc/PID/smaps_rollup): `pss` charges
    each shared page (a library's code, mapped by every daemon) to its sharers in proportion, `private`
    counts only pages no other process maps. On one machine running N daemons, `pss` is what each one
    adds; on a site's own machine, where nothing shares its libraries, RSS is."""
    out = {"pss": 0, "private": 0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            out["pss"] = int(value.split()[0]) * 1024
        elif key in ("Private_Clean", "Private_Dirty"):
            out["private"] += int(value.split()[0]) * 1024
    return out


def tree_peak_rss_bytes(root: int) -> int:
    return sum(peak_rss_bytes(p) for p in tree_pids(root) if p != os.getpid())


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds the process has used so far; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in tree_pids(root)}
