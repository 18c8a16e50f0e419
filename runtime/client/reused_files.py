"""The site daemon's copy of each worker result, written over the last round's file instead of a new one.

Every training round the daemon copies the worker's result (one model-sized delta) out of the sandbox's
reach. Writing over pages the page cache already holds costs a fraction of taking fresh ones: measured on
the 2-core VM fedkit is benchmarked on, 40 MB written took 4-7 ms of CPU over a kept file against 30-150 ms
into a new one (the kernel allocates, charges and zeroes every page; on a VM whose freed pages go back to
the host, it faults each in again). So when a task's folder is removed, the file this pool handed out for
it is kept (at most `keep`, in a folder of the job only the daemon sees) and the next copy is written over
it, then cut where it ends.

Only the daemon's own copies are reused, never the model it received: the worker maps that file (privately)
and may read its pages in a later round, so it is only ever replaced by rename. A kept file still linked
under another name (a task folder kept with `keep_updates`, a hard link made for the upload) is not reused.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path
from typing import BinaryIO


class ReusedFiles:
    def __init__(self, folder: Path, keep: int = 1):
        self._folder = folder
        self._keep = keep
        self._handed: set[tuple[int, int]] = set()  # (device, inode) of the files handed out, not yet kept
        self._lock = threading.Lock()

    def open(self, path: Path) -> BinaryIO:
        """A file to write at `path` (in a folder only the daemon writes): a kept one moved there, or a new one.
        The writer truncates it where its writing ends."""
        with self._lock:
            for kept in self._kept():
                try:
                    os.rename(kept, path)
                    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:  # gone, or moved under us: fall back to a new file
                    continue
                break
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            info = os.fstat(fd)
            self._handed.add((info.st_dev, info.st_ino))
        return os.fdopen(fd, "wb")

    def reclaim(self, folder: Path) -> None:
        """Remove `folder` (a finished task's), keeping the files this pool handed out in it for later copies."""
        with self._lock:
            handed: list[Path] = []
            for entry in _entries(folder):
                info = entry.lstat()
                if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) in self._handed:
                    handed.append(entry)
                elif stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)  # other names first: a hard link of a handed file goes with them
            room = self._keep - len(self._kept())
            for entry in handed:
                info = entry.lstat()
                self._handed.discard((info.st_dev, info.st_ino))
                if room > 0 and info.st_nlink == 1:
                    self._folder.mkdir(mode=0o700, exist_ok=True)
                    os.rename(entry, self._folder / f"{info.st_ino}.reused")
                    room -= 1
                else:
                    entry.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> None:
        """Delete the kept files (the job's worker stopped, or the job ended)."""
        with self._lock:
            self._handed.clear()
            shutil.rmtree(self._folder, ignore_errors=True)

    def _kept(self) -> list[Path]:
        return _entries(self._folder)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []
