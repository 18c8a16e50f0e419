"""Injecting one scheduled fault into a running study and undoing it: each kind is prepared before its
round starts (trigger files, proxy modes, a full disk), fired at its point of the round (kills), and
cleaned up once the round closed (files removed, links passing again, disk unmounted).

Everything here acts on processes by PID (LocalStudy.kill), on files the driver owns (a site's data root)
and on the study's own fault proxy; nothing waits without a bound."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provision.local_study import LocalStudy

from ..faultproxy import FaultProxy
from .schedule import Fault, Kind

CRASH_TRIGGER, HOLD_TRIGGER = "crash", "hold"  # the soak learner's trigger files (tests/e2e/jobs/soak)
SITE_DISK_BYTES = 32 << 20  # a site's jobs folder (the soak model is 256 bytes: this holds many rounds)
FILLER = ".soak-disk-filler"
MOUNT_TIMEOUT_S = 20.0

SITE_KILLS = (Kind.SITE_KILL, Kind.SITES_KILL)
SERVER_KILLS = (Kind.SERVER_KILL_MID, Kind.SERVER_KILL_BETWEEN)
LINK_FAULTS = (Kind.LINK_STALL, Kind.LINK_RESET, Kind.LINK_SLOW)


def can_mount_tmpfs(probe_dir: Path) -> bool:
    """Whether this process may mount a tmpfs (root, and a kernel/container that allows it)."""
    if os.geteuid() != 0:
        return False
    probe_dir.mkdir(parents=True, exist_ok=True)
    ok = _run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe_dir)])
    if ok:
        _run(["umount", str(probe_dir)])
    return ok


def _run(args: list[str]) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=MOUNT_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Injector:
    study: LocalStudy
    proxy: FaultProxy
    data_dirs: dict[str, Path]
    restart_server: Callable[[], None]  # start the server and wait until it listens behind the proxy
    mounts: list[Path] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    # ---- the three points of a fault's life --------------------------------------------------------

    def prepare(self, fault: Fault) -> None:
        """Before the fault's round is sent (the previous round closed)."""
        kind = fault.kind
        if kind in SITE_KILLS:
            for site in fault.sites:
                (self.data_dirs[site] / HOLD_TRIGGER).touch()
        elif kind is Kind.WORKER_CRASH:
            (self.data_dirs[fault.sites[0]] / CRASH_TRIGGER).touch()
        elif kind is Kind.DISK_FULL:
            self._fill_disk(fault.sites[0])
        elif kind is Kind.LINK_STALL:
            self.proxy.stall(direction=fault.direction, after_bytes=fault.after_bytes, times=1,  # type: ignore[arg-type]
                             pids=self._daemon_pids(fault.sites))
        elif kind is Kind.LINK_RESET:
            self.proxy.reset(after_bytes=fault.after_bytes, direction=fault.direction, times=1,  # type: ignore[arg-type]
                             pids=self._daemon_pids(fault.sites))
        elif kind is Kind.LINK_SLOW:
            self.proxy.delay(fault.delay_ms)

    def _daemon_pids(self, sites: tuple[str, ...]) -> frozenset[int]:
        """The site daemons a link fault cuts: the connections they dial (a site with no daemon running,
        e.g. one that died, is cut nowhere rather than some other site in its place)."""
        return frozenset(self.study.procs[s].pid if s in self.study.procs else -1 for s in sites)

    def fire(self, fault: Fault) -> None:
        """At the fault's point of its round: mid-round (its tasks sent) or between (the round closed)."""
        if fault.kind in SITE_KILLS:
            # a reboot: killed, then started again at once; it registers again, is sent its task again and
            # answers this same round (the round waits rejoin_wait_s for it), however long its start takes
            for site in fault.sites:
                killed = site in self.study.procs
                if killed:
                    self.study.kill(site)
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dirs[site] / HOLD_TRIGGER).unlink()
                if killed:
                    self.study.start(site)
        elif fault.kind in SERVER_KILLS:
            self.study.kill(self.study.server)
            self.restart_server()

    def cleanup(self, fault: Fault) -> None:
        """After the fault's round closed (or its job ended): everything back as it was."""
        kind = fault.kind
        for site in fault.sites:
            for trigger in (HOLD_TRIGGER, CRASH_TRIGGER):
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dirs[site] / trigger).unlink()
        if kind in LINK_FAULTS:
            self.proxy.pass_()
        if kind is Kind.DISK_FULL:
            self._free_disk(fault.sites[0])

    # ---- disk full ----------------------------------------------------------------------------------

    def mount_disk(self, site: str) -> bool:
        """Before the site starts: its jobs folder on a small tmpfs of its own, so the driver can fill that
        disk (and only that one) to the last byte and free it again while the site runs."""
        jobs = self.study.kits[site] / "workspace" / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        if not _run(["mount", "-t", "tmpfs", "-o", f"size={SITE_DISK_BYTES},mode=0700", "tmpfs", str(jobs)]):
            self.log.append(f"disk_full: could not mount a tmpfs over {jobs}")
            return False
        self.mounts.append(jobs)
        return True

    def _fill_disk(self, site: str) -> None:
        """Write until not one more byte fits (big writes, then page-sized, then single bytes)."""
        jobs = self.study.kits[site] / "workspace" / "jobs"
        if jobs not in self.mounts:
            return
        fd = os.open(jobs / FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (256 << 10, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)

    def _free_disk(self, site: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.study.kits[site] / "workspace" / "jobs" / FILLER).unlink()

    def unmount_all(self) -> None:
        """After the study stopped: every tmpfs this injector mounted, gone."""
        while self.mounts:
            jobs = self.mounts.pop()
            if not _run(["umount", str(jobs)]) and not _run(["umount", "-l", str(jobs)]):
                self.log.append(f"disk_full: could not unmount {jobs}")
