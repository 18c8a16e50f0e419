"""Model-sized files the site daemon writes every round, written over an earlier round's file instead of a
new one: its copy of the worker's result (ReusedFiles) and the model it receives (SpareModel).

Pages the page cache already holds cost a fraction of fresh ones (runtime/file_reuse.py, with the figures).
The kept files live in the job's reuse/ folder, which the sandbox does not see, and go when the job's
worker stops or the job ends.

- ReusedFiles: when a task's folder is removed, the copy of the worker's result made for it is kept (at
  most `keep`), and the next copy is written over it, then cut where it ends. A copy still linked under
  another name (a task folder kept with `keep_updates`) is not reused.
- SpareModel: the worker maps each model it receives (privately) and may read its pages in a later round,
  so a received model is written over only once the worker said it no longer maps or holds it open.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import BinaryIO

from ..file_reuse import open_over, sole_name


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
            for kept in self._kept()[:1]:
                with contextlib.suppress(OSError):  # it cannot be moved: a new file instead
                    os.replace(kept, path)
            file = open_over(path)  # a new file when none was kept
            info = os.fstat(file.fileno())
            self._handed.add((info.st_dev, info.st_ino))
        return file

    def reclaim(self, folder: Path) -> None:
        """Remove `folder` (a finished task's), keeping the files this pool handed out in it for later copies.
        Never raises: on any error (a full disk) the folder just goes, and nothing is kept."""
        try:
            self._reclaim(folder)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)

    def _reclaim(self, folder: Path) -> None:
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
        return [p for p in _entries(self._folder) if p.suffix == ".reused"]  # not SpareModel's file beside them


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # absent, or not a folder: nothing kept there
        return []


class SpareModel:
    """The global model this site trained on two rounds back, kept to receive a later download over it.

    The worker maps each model it receives and may read it in a later round, so a received file is written
    over only when the worker said, in its reply to the train task after it, that it no longer maps or holds
    that file open (its `held` answer about the inode the train command named in `release`). By then the
    file has left the inbox (the only folder of it the worker sees), so the worker cannot open it again. A
    worker that lies only sees a later global model of its own job where it kept an old one."""

    def __init__(self, folder: Path):
        self._path = folder / "received.spare"
        self._free = False
        self._lock = threading.Lock()

    def retire(self, model: Path, held: bool) -> None:
        """`model` (the site's last reference model, about to be replaced) becomes the spare, unless another
        name links it; free to be written over unless the worker `held` it."""
        with self._lock:
            self._free = False
            if sole_name(model) is None:
                return
            try:
                self._path.parent.mkdir(mode=0o700, exist_ok=True)
                os.rename(model, self._path)
            except OSError:
                return
            self._free = not held

    def open(self, path: Path) -> BinaryIO:
        """A file to write the next received model at `path` (in the inbox): the spare when it is free, moved
        there, else a new file. The writer truncates it where its writing ends."""
        with self._lock:
            free, self._free = self._free, False
            if free and sole_name(self._path) is not None:
                with contextlib.suppress(OSError):  # it cannot be moved: a new file instead
                    os.replace(self._path, path)
                    return open_over(path)
        return path.open("wb")
