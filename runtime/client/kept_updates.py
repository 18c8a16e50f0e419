"""The models a job asked this site to keep (`keep_updates: true`), bounded by the site, not the job.

A job that keeps each round's received global and sent update writes two models per round into the site's
workspace: 40 rounds of a 500 MB model are 40 GB, on the disk that also holds the site's audit log. The site
owns that disk, so local/site.yml `keep_updates_max_mb` caps what all jobs together keep: after each kept
task the oldest kept task folders (of any job) go until the rest fits, and 0 keeps none. Sizes count the
blocks a file takes on disk, so a sparse file counts for what it holds.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .job_folders import JobFolders

MIB = 1 << 20


@dataclass(frozen=True)
class KeptFolder:
    path: Path
    bytes: int
    mtime: float


def _disk_bytes(folder: Path) -> int:
    total = 0
    for entry in folder.rglob("*"):
        try:
            st = entry.lstat()
        except OSError:  # removed meanwhile
            continue
        total += st.st_blocks * 512
    return total


def kept_folders(jobs_root: Path) -> list[KeptFolder]:
    """Every task folder left in a job's inbox (a finished task's folder goes unless its job keeps it), oldest
    first."""
    found = []
    for inbox in jobs_root.glob(f"*/{JobFolders(Path()).inbox.name}"):
        for folder in inbox.iterdir():
            try:
                st = folder.lstat()
            except OSError:
                continue
            if folder.is_dir() and not folder.is_symlink():
                found.append(KeptFolder(folder, _disk_bytes(folder), st.st_mtime))
    return sorted(found, key=lambda f: (f.mtime, str(f.path)))


def trim_kept(jobs_root: Path, max_mb: int) -> list[KeptFolder]:
    """Remove the oldest kept folders until the rest takes at most `max_mb` MiB; the ones removed."""
    folders = kept_folders(jobs_root)
    total = sum(f.bytes for f in folders)
    removed = []
    for folder in folders:
        if total <= max_mb * MIB:
            break
        shutil.rmtree(folder.path, ignore_errors=True)
        if not os.path.lexists(folder.path):
            total -= folder.bytes
            removed.append(folder)
    return removed
