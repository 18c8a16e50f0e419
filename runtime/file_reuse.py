"""Writing a model-sized file over an earlier round's file instead of a new one, once nothing reads it.

Writing over pages the page cache already holds costs a fraction of taking fresh ones. Measured on the
2-core VM fedkit is benchmarked on, 40 MB written 0.7 s apart: 4-7 ms of CPU over a kept file, 33-147 ms
into a new file (the kernel allocates, charges and zeroes every page; on a VM whose freed pages go back to
the host, it faults each in again). So the files a round writes are written over older ones: the server's
update spool (server/update_spool.py) and its global model (model_bytes.SerializedModel.save), a worker's
result and a site daemon's copy of it and its downloads (client/reused_files.py, client/worker.py).

A file is written over only when no reader can see the change: no other name links it (`sole_name`) and
no process that might read it maps it or holds it open (`held_here`, which that process asks of itself;
Linux's /proc/self tells, and elsewhere, or when it cannot be read, the answer is "held").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def held_here(inode: int) -> bool:
    """Whether this process holds open, or maps, a file with `inode`. The inode alone is compared: a map
    under overlayfs may name another device, and a false "held" only costs a new file."""
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                    return True
            except OSError:  # closed meanwhile (the listing's own descriptor among them)
                continue
        wanted = str(inode)
        with open("/proc/self/maps") as maps:
            return any(len(fields := line.split(maxsplit=5)) >= 5 and fields[4] == wanted for line in maps)
    except OSError:
        return True


def sole_name(path: Path) -> os.stat_result | None:
    """`path`'s status when it is a regular file that no other name links, else None (also when absent)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 else None


def open_over(path: Path) -> BinaryIO:
    """`path` opened to be written from its start without truncating it first (made if absent; a link there
    is refused). The writer truncates it where its writing ends."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "wb")
