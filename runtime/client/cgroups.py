"""Per-worker cgroups: the CPU, memory and process limits of one job's sandbox, where the host lets us.

The daemon creates a cgroup for the job (`fedkit-<job>-<random>`), writes the limits there, and the
worker joins before it starts anything (see sandbox_enter.py). Where it goes:
    - cgroup v1 (and hybrid hosts): below the daemon's own group in each controller's hierarchy, if the
      daemon may write there (root, or a group site IT made for it);
    - cgroup v2: one group for all limits (a process sits in one v2 group), below the nearest writable
      group from the daemon's own upwards that hands the controllers down. For root that is e.g.
      system.slice; a non-root service whose only writable group is its own cannot use it (v2 forbids
      enabling controllers for children of a group that holds processes), so its limits fall back.
Where a controller is not writable the limit is reported as not enforced, and sandbox_native falls back
to an address-space rlimit for memory and CPU affinity for cpus; a process limit has no safe fallback
(with every sandbox uid mapped to the daemon's one host uid, RLIMIT_NPROC would count the daemon's own
processes too). A daemon killed with SIGKILL leaves its jobs' empty groups behind.

Never raises on a host without cgroups: everything answers "not here" instead.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .sandbox import SandboxLimits

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
EMPTY_WAIT_S = 5.0


@dataclass(frozen=True)
class _Mount:
    path: Path
    version: int                 # 1 or 2
    controllers: frozenset[str]  # v1: those of this hierarchy; v2: those enabled for our children


@dataclass(frozen=True)
class CgroupPlan:
    """Where each limit of one worker goes: controller -> (parent folder, cgroup version)."""

    targets: dict[str, tuple[Path, int]]

    def enforced_by(self, controller: str) -> str | None:
        target = self.targets.get(controller)
        return f"cgroup v{target[1]}" if target else None


def _mounts(mountinfo: str) -> list[_Mount]:
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        fstype, mount_point, options = rest[0], Path(fields[4]), rest[2].split(",")
        if fstype == "cgroup":
            found.append(_Mount(mount_point, 1, frozenset(o for o in options if o in ("memory", "pids", "cpu"))))
        elif fstype == "cgroup2":
            found.append(_Mount(mount_point, 2, frozenset()))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup per controller ("" key: the v2 unified one), from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _v2_parent(mount: Path, own: str, wanted: set[str]) -> tuple[Path, set[str]] | None:
    """The cgroup, from ours up to the mount's root, that hands the most of `wanted` to its children and
    that we may write (the nearest on a tie). A v2 process sits in exactly one cgroup, so all v2 limits
    share that one group; and a v2 group holding processes (the daemon's own) cannot enable controllers
    for children, so a delegated parent (or, for root, a top group) is where job groups can go."""
    best: tuple[Path, set[str]] | None = None
    folder = mount / own.lstrip("/")
    while True:
        enabled = set(_read(str(folder / "cgroup.subtree_control")).split()) & wanted
        if enabled and os.access(folder, os.W_OK) and (best is None or len(enabled) > len(best[1])):
            best = (folder, enabled)
        if folder == mount or mount not in folder.parents:
            return best
        folder = folder.parent


def plan(limits: SandboxLimits, mountinfo: str | None = None, proc_cgroup: str | None = None) -> CgroupPlan:
    """Which of `limits` can go into a cgroup here (a cheap look at mountinfo and permissions). The two
    texts default to this process's /proc/self/mountinfo and /proc/self/cgroup (tests pass their own)."""
    wanted = {c for c, v in (("memory", limits.memory_bytes), ("pids", limits.pids), ("cpu", limits.cpus))
              if v is not None}
    mounts = _mounts(_read("/proc/self/mountinfo") if mountinfo is None else mountinfo)
    own = _own_paths(_read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup)
    targets: dict[str, tuple[Path, int]] = {}
    for mount in mounts:  # v1 hierarchies first: on a hybrid host they hold the controllers
        if mount.version == 1:
            for c in sorted(mount.controllers & wanted):
                parent = mount.path / own.get(c, "/").lstrip("/")
                if c not in targets and os.access(parent, os.W_OK):
                    targets[c] = (parent, 1)
    for mount in mounts:
        found = _v2_parent(mount.path, own.get("", "/"), wanted - set(targets)) if mount.version == 2 else None
        if found is not None:
            parent, controllers = found
            targets.update({c: (parent, 2) for c in controllers})
    return CgroupPlan(targets)


class WorkerCgroups:
    """The cgroups of one running worker: created with limits, joined by the worker, removed at its end."""

    def __init__(self, folders: dict[str, tuple[Path, int]]):
        self._folders = folders

    @classmethod
    def create(cls, the_plan: CgroupPlan, limits: SandboxLimits, name: str) -> WorkerCgroups:
        """Create one child cgroup per planned controller and write its limit. A controller whose folder
        cannot be made is skipped (and stays unenforced), so this never raises OSError."""
        folders: dict[str, tuple[Path, int]] = {}
        made: set[Path] = set()  # on v2 several controllers share one folder
        leaf = f"fedkit-{name}-{secrets.token_hex(4)}"
        for controller, (parent, version) in the_plan.targets.items():
            folder = parent / leaf
            try:
                if folder not in made:
                    folder.mkdir()
                    made.add(folder)
                for file, value, is_required in _limit_files(controller, version, limits):
                    try:
                        (folder / file).write_text(value)
                    except OSError:
                        if is_required:
                            raise
            except OSError:
                if not any(f == folder for f, _ in folders.values()):
                    _remove(folder)
                    made.discard(folder)
                continue
            folders[controller] = (folder, version)
        return cls(folders)

    @property
    def procs_files(self) -> list[Path]:
        """The cgroup.procs files a process writes its pid into to join (one per distinct folder)."""
        return sorted({folder / "cgroup.procs" for folder, _ in self._folders.values()})

    def enforced(self) -> dict[str, str]:
        return {c: f"cgroup v{v}" for c, (_, v) in self._folders.items()}

    def pids(self) -> set[int]:
        found: set[int] = set()
        for file in self.procs_files:
            try:
                found.update(int(p) for p in file.read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def memory_exhausted(self) -> bool:
        """Whether the kernel killed a process of this worker for passing its memory limit (the oom_kill
        count of memory.events on v2, of memory.oom_control on v1, kernel 4.13 on)."""
        entry = self._folders.get("memory")
        if entry is None:
            return False
        folder, version = entry
        for line in _read(str(folder / ("memory.events" if version == 2 else "memory.oom_control"))).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return value.strip().isdigit() and int(value) > 0
        return False

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self, wait_s: float = EMPTY_WAIT_S) -> None:
        """Kill what is left, wait (bounded) until the groups are empty, and remove them."""
        deadline = time.monotonic() + wait_s
        while True:
            self.kill_all()
            if not self.pids() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for folder in {folder for folder, _ in self._folders.values()}:
            _remove(folder)


def _limit_files(controller: str, version: int, limits: SandboxLimits) -> list[tuple[str, str, bool]]:
    """(file, value, is_required) to write, in order; swap limits are optional (no swap accounting)."""
    if controller == "memory" and limits.memory_bytes is not None:
        value = str(limits.memory_bytes)
        if version == 1:  # the memory+swap limit may only be set after the memory limit
            return [("memory.limit_in_bytes", value, True), ("memory.memsw.limit_in_bytes", value, False)]
        return [("memory.max", value, True), ("memory.swap.max", "0", False)]
    if controller == "pids" and limits.pids is not None:
        return [("pids.max", str(limits.pids), True)]
    if controller == "cpu" and limits.cpus is not None:
        quota_us = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if version == 1:
            return [("cpu.cfs_period_us", str(CPU_PERIOD_US), True), ("cpu.cfs_quota_us", str(quota_us), True)]
        return [("cpu.max", f"{quota_us} {CPU_PERIOD_US}", True)]
    return []


def _remove(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
