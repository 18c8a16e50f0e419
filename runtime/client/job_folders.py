"""One job's folders on a site, laid out so the worker can never plant a link where the daemon writes.

    workspace/jobs/<job>/code     the job folder as received; read-only to the worker
                         scratch  the worker's own folder (SiteContext.work_dir); the daemon never reads it
                         inbox    the daemon writes the models it received here (one folder per task);
                                  read-only to the worker
                         outbox   the worker writes its results here; read-write to the worker
                         reuse    the daemon's last copy of a result, kept to be written over (reused_files)

Everything in outbox is the job's code's doing, so the daemon opens a result there once, with O_NOFOLLOW
and O_NONBLOCK relative to the outbox folder's descriptor, accepts only a regular file of bounded size,
and copies it into inbox before using it. It never follows, trusts or reuses anything else the worker
created.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .worker_replies import WorkerReplyRefused

COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class JobFolders:
    root: Path

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def reuse(self) -> Path:
        return self.root / "reuse"

    def create(self) -> None:
        """Make scratch, inbox and outbox (code appears when the job is unpacked)."""
        for folder in (self.scratch, self.inbox, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)


def take_result(outbox: Path, name: str, dest: Path, max_bytes: int,
                open_dest: Callable[[Path], BinaryIO] | None = None, room: int | None = None) -> int:
    """Copy the worker's result `outbox/name` to `dest` (a daemon-owned path) and remove it from outbox.
    `open_dest` opens the file written before it is renamed to `dest` (ReusedFiles.open: a kept file to
    write over), a new file by default.

    Refuses (WorkerReplyRefused, one line) a missing file, a link, anything but a regular file, a file over
    `max_bytes`, and one larger than `room`, the bytes the site's disk holds above its floor (a sparse file
    claiming gigabytes costs the job nothing to write and the site its whole disk to copy). Returns the bytes
    copied."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad result name {name!r}")
    dir_fd = os.open(outbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except FileNotFoundError:
            raise WorkerReplyRefused(f"worker reply refused: it wrote no result file {name}") from None
        except OSError as e:  # ELOOP: a symlink where the result should be
            raise WorkerReplyRefused(f"worker reply refused: result {name} cannot be opened safely "
                                     f"({e.strerror}); it must be a plain file") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise WorkerReplyRefused(f"worker reply refused: result {name} is not a regular file")
            if info.st_size > max_bytes:
                raise WorkerReplyRefused(f"worker reply refused: result {name} has {info.st_size} bytes, "
                                         f"more than the {max_bytes} allowed")
            if room is not None and info.st_size > room:
                raise WorkerReplyRefused(f"worker reply refused: result {name} has {info.st_size} bytes, more than "
                                         f"the {room} this site's disk holds above local/site.yml "
                                         "sandbox.min_free_disk_mb")
            copied = 0
            tmp = dest.with_name(dest.name + ".part")
            with os.fdopen(os.dup(fd), "rb") as src, (open_dest or _new_file)(tmp) as out:
                # the size checked above, and not a byte more: the job's code may still hold the file and
                # extend it (a sparse gigabytes costs it nothing, the site's disk all its room) while we copy
                while copied < info.st_size and (chunk := src.read(min(COPY_CHUNK_BYTES, info.st_size - copied))):
                    copied += len(chunk)
                    out.write(chunk)
                grew = src.read(1)
                out.truncate()  # a file written over may have been longer
            if copied != info.st_size or grew:
                tmp.unlink(missing_ok=True)
                raise WorkerReplyRefused(f"worker reply refused: result {name} changed size while being read "
                                         "(the job's code still wrote it after its reply)")
            tmp.replace(dest)
        finally:
            os.close(fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        return copied
    finally:
        os.close(dir_fd)


def _new_file(path: Path) -> BinaryIO:
    return path.open("wb")
