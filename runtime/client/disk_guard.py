"""The site's disk against a job that fills it: local/site.yml `sandbox.min_free_disk_mb`.

A job writes in its own scratch/ and outbox/ folders, on the disk that also holds the site's workspace:
its audit log, its DP ledgers, the kit. A job that filled it would stop the site from recording what it
does, and could take down other services of the hospital machine. Quotas need root or a file system of
their own, so the site watches instead: while a job's worker runs, the free space of the workspace's file
system is read every CHECK_INTERVAL_S (one statvfs call); when it falls below the floor the worker is
killed, the job's scratch and outbox are emptied, and the site takes no more of that job's tasks. A worker
does not start while the disk is already below the floor. The bound is soft: a job writing at W bytes per
second may pass the floor by about W * CHECK_INTERVAL_S before it is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import JobRejected

log = logging.getLogger("fedkit.client")

CHECK_INTERVAL_S = 0.5
MIB = 1 << 20
# files the site may still need while a job runs (audit, ledgers, a task's folders): a job making millions
# of empty files used up a file system's inodes with its free bytes untouched
MIN_FREE_INODES = 10_000
EMPTY_TIMEOUT_S = 600.0  # millions of files take a while


def free_mb(path: Path) -> float:
    """Free space, in MiB, that an unprivileged writer may still use on `path`'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MIB


def free_inodes(path: Path) -> int | None:
    """Files an unprivileged writer may still create on `path`'s file system; None where it has no fixed
    number (btrfs and others report 0 of 0)."""
    st = os.statvfs(path)
    return st.f_favail if st.f_files else None


class DiskGuard:
    """The floor of free space under a site's workspace; None as the floor turns the guard off."""

    def __init__(self, workspace: Path, min_free_mb: int | None,
                 free: Callable[[Path], float] = free_mb,
                 inodes: Callable[[Path], int | None] = free_inodes) -> None:
        self._workspace, self.min_free_mb, self._free, self._inodes = workspace, min_free_mb, free, inodes

    def _short_of_files(self) -> int | None:
        """The free inodes when they are below MIN_FREE_INODES, else None."""
        left = self._inodes(self._workspace)
        return left if left is not None and left < MIN_FREE_INODES else None

    def room_bytes(self) -> int | None:
        """What may still be written above the floor (None: the guard is off): the daemon's own copy of a
        job's result must fit in it, since the guard only stops the job's worker."""
        if self.min_free_mb is None:
            return None
        return max(0, int((self._free(self._workspace) - self.min_free_mb) * MIB))

    def check_room(self, job_id: str) -> None:
        """Raise JobRejected when the disk is already below the floor (no worker starts)."""
        if self.min_free_mb is None:
            return
        free = self._free(self._workspace)
        if free < self.min_free_mb:
            raise JobRejected(f"job {job_id} not started: the disk holding this site's workspace has {free:.0f} MiB "
                              f"free, below local/site.yml sandbox.min_free_disk_mb ({self.min_free_mb}); free "
                              "some space on it")
        if (files := self._short_of_files()) is not None:
            raise JobRejected(f"job {job_id} not started: the disk holding this site's workspace has room for only "
                              f"{files} more files (fewer than {MIN_FREE_INODES}); remove some files from it")

    async def watch(self, job_id: str, job_folders: tuple[Path, ...], stop: Callable[[str], None],
                    stopped: Callable[[str], None] | None = None) -> None:
        """Until cancelled: when free space falls below the floor, `stop(reason)` (which kills the worker;
        the reason first, so the task the kill interrupts fails with it), then empty the job's folders, then
        `stopped(reason)`: only then may the site write again (its audit), the disk being possibly full.
        Returns at once when the guard is off."""
        if self.min_free_mb is None:
            return
        while (free := self._free(self._workspace)) >= self.min_free_mb and (files := self._short_of_files()) is None:
            await asyncio.sleep(CHECK_INTERVAL_S)
        short = (f"fell to {free:.0f} MiB free while the job ran, below local/site.yml sandbox.min_free_disk_mb "
                 f"({self.min_free_mb})" if free < self.min_free_mb else
                 f"had room for only {files} more files while the job ran (fewer than {MIN_FREE_INODES})")
        reason = (f"job {job_id} stopped on this site: the disk holding its workspace {short}; the job's scratch and "
                  "outbox were emptied and this site takes no more of its tasks")
        log.error("%s", reason)
        stop(reason)
        await asyncio.to_thread(empty_folders, job_folders)
        if stopped is not None:
            stopped(reason)


def empty_folders(folders: tuple[Path, ...]) -> list[str]:
    """Remove everything inside each folder, keeping the folder; never raises. What a job left there is its
    code's doing: a tree 1,000 folders deep (shutil.rmtree recursed into it until RecursionError, which
    stopped the whole site with the disk still full) or folders it made unwritable. GNU find walks any
    depth without following links; `-execdir` gives chmod a short relative name at every depth. Returns
    one line per folder it could not empty (also logged)."""
    problems = []
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            os.chmod(folder, folder.stat().st_mode | 0o700)  # the job's own folder: it may have locked it
            for command in (["find", str(folder), "-mindepth", "1", "-type", "d", "!", "-perm", "-u=rwx",
                             "-execdir", "chmod", "u+rwx", "{}", ";"],
                            ["find", str(folder), "-mindepth", "1", "-delete"]):
                subprocess.run(command, capture_output=True, timeout=EMPTY_TIMEOUT_S, check=False,
                               stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
            left = next(folder.iterdir(), None)
        except (OSError, subprocess.TimeoutExpired) as e:
            left, problem = folder, str(e)
        else:
            problem = f"{left.name} is still there" if left is not None else ""
        if left is not None:
            problems.append(f"{folder}: {problem}")
            log.error("could not empty %s: %s; remove what is left by hand", folder, problem)
    return problems
