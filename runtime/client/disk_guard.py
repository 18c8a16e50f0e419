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
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import JobRejected

log = logging.getLogger("fedkit.client")

CHECK_INTERVAL_S = 0.5
MIB = 1 << 20
# files the site may still need while a job runs (audit, ledgers, a task's folders): a job making millions
# of empty files used up a file system's inodes with its free bytes untouched
MIN_FREE_INODES = 10_000


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


def empty_folders(folders: tuple[Path, ...]) -> None:
    """Remove everything inside each folder, keeping the folder."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
