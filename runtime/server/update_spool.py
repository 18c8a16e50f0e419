"""Where one site's incoming update lives between its first byte and the end of its fold.

Every update but a tiny one (over SPOOL_ABOVE_BYTES, 1 MiB) is written to a file in the job store's
incoming folder as it arrives, then mapped read-only for its fold and unmapped as soon as the fold
returns. With several upload slots, N updates arriving at once would otherwise each hold a model-sized
buffer in the server's memory (4 slots of a 40 MB model: 160 MB; of a 2 GB model: 8 GB); on disk they
cost page cache, which the kernel gives back under pressure. Folds run one at a time (the controller's
fold lock), so the server's memory holds one update at a time: the one being folded, and of that only
the tensor being checked or folded (weights.drop_read_pages lets each go once read). FedAvg then writes
the new model over its running sum, reading the old model from a map of its file. The server's peak is
about the running sum (1x the model) plus a tensor or two, and its transfer buffers, at any number of
sites (docs/architecture.md, "Server memory").

Measured (bench/server_memory.py, P=10M, 40 MB model, N=2): with updates up to 64 MiB received into
memory, two were held at once (one in a reused buffer, one grown from nothing); spooling them took the
server's peak from 452 to 364 MB. Spooling costs one 1 MiB write per chunk into the page cache and one
mapping per fold, in worker threads.

A spool file is rewritten in place by the job's next update (SpoolFiles), not deleted and made anew:
pages the page cache already holds cost a fraction of fresh ones (runtime/file_reuse.py, with the figures).
The files live as long as the job (about one per upload slot, since each update in flight holds a slot and
its file) and are deleted when it ends.

A tiny update (a few counters, a test model) stays in memory, in a buffer reused from the previous one:
a file per update would cost more than it saves. At most one such buffer is kept between updates.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from ..transport import PayloadReceiver

SPOOL_ABOVE_BYTES = 1 << 20  # larger updates go to disk as they arrive (see the module docstring)
KEEP_BUFFERS = 1  # in-memory buffers kept for the next tiny update


class SpoolFiles:
    """A job's spool files between updates, each rewritten in place by the next one (see the module docstring).

    `take` in the event loop, `give_back` from any thread; after `close` (the job ended) a file given back
    is deleted. Files are 0600, named update-*.spool in the job store's incoming folder (cleared when the
    server starts).

    A file whose map cannot be closed yet (a view of it outlives its fold, in a reference cycle the garbage
    collector has not broken) is never rewritten while that view could read it: it waits, and serves a
    later update only once its map closes."""

    def __init__(self, folder: Path):
        self._folder = folder
        self._idle: list[tuple[Path, BinaryIO]] = []
        self._viewed: list[tuple[Path, BinaryIO, mmap.mmap]] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> tuple[Path, BinaryIO]:
        """A kept file, rewound, or a new one."""
        with self._lock:
            self._idle += [(path, file) for path, file, mapped in self._viewed if _closed_now(mapped)]
            self._viewed = [entry for entry in self._viewed if not entry[2].closed]
            if self._idle:
                path, file = self._idle.pop()
                file.seek(0)
                return path, file
        fd, name = tempfile.mkstemp(prefix="update-", suffix=".spool", dir=self._folder)  # 0600
        return Path(name), os.fdopen(fd, "r+b")

    def give_back(self, path: Path, file: BinaryIO, mapped: mmap.mmap | None = None) -> None:
        """Keep the file (and its map, until it can be closed) for a later update; delete it once the job ended."""
        with self._lock:
            if not self._closed:
                if mapped is None or _closed_now(mapped):
                    self._idle.append((path, file))
                else:
                    self._viewed.append((path, file, mapped))
                return
        _delete(path, file, mapped)

    def close(self) -> None:
        """Delete the kept files; any given back later are deleted too."""
        with self._lock:
            self._closed = True
            kept = [(path, file, None) for path, file in self._idle] + self._viewed
            self._idle, self._viewed = [], []
        for path, file, mapped in kept:
            _delete(path, file, mapped)


def _closed_now(mapped: mmap.mmap) -> bool:
    """Close the map unless a view of it is still alive; whether it is closed."""
    try:
        mapped.close()
    except BufferError:
        return False
    return True


def _delete(path: Path, file: BinaryIO, mapped: mmap.mmap | None) -> None:
    if mapped is not None:
        _closed_now(mapped)  # else unmapped when its last view goes; the deleted file's bytes live on till then
    with contextlib.suppress(OSError):  # a cut-off upload's buffered tail, on a full disk: it is going anyway
        file.close()
    path.unlink(missing_ok=True)


class IncomingUpdate:
    """One update's receiver and, once complete, its bytes (a bytearray, or a read-only map of its file).

    `release()` always: it gives a small buffer back for reuse, or unmaps the spool file and gives it back."""

    def __init__(self, declared_bytes: int, limit_bytes: int, sha256: str, spool: SpoolFiles,
                 free_buffers: list[bytearray], spool_above_bytes: int = SPOOL_ABOVE_BYTES):
        self._free = free_buffers
        self._spool = spool
        self._declared = declared_bytes
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None
        self._buffer: bytearray | None = None
        if declared_bytes > spool_above_bytes and declared_bytes <= limit_bytes:
            self._path, self._file = spool.take()
            self.receiver = PayloadReceiver(declared_bytes, limit_bytes, sha256, sink=self._file)
        else:
            buffer = free_buffers.pop() if free_buffers else None
            self.receiver = PayloadReceiver(declared_bytes, limit_bytes, sha256, buffer=buffer)

    def finish(self, trailer_sha256: str = "") -> bytearray | mmap.mmap:
        """The complete, hash-checked payload (blocking: call it in a worker thread)."""
        if self._file is None:
            self._buffer = self.receiver.finish(trailer_sha256)
            return self._buffer
        self._file.flush()
        self.receiver.finish(trailer_sha256)
        self._file.truncate()  # a reused file may hold a longer update: end it where this one ends
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._declared else None
        return self._map if self._map is not None else bytearray()

    def release(self) -> None:
        """Give the buffer back (at most KEEP_BUFFERS are kept), or drop the map's pages and give the spool
        file back for a later update."""
        if self._buffer is not None and len(self._free) < KEEP_BUFFERS:
            self._free.append(self._buffer)
        self._buffer = None
        if self._map is not None:
            _drop_pages(self._map)
        if self._file is not None and self._path is not None:
            self._spool.give_back(self._path, self._file, self._map)
        self._file = self._path = self._map = None


def _drop_pages(mapped: mmap.mmap) -> None:
    """Take the mapping's pages out of the server's resident memory now, even while views of it live on.

    The fold's arrays are views of the map, and asyncio's thread-future chain keeps the last SiteResult
    (with those views) in a reference cycle until the garbage collector runs: `close()` then fails and the
    whole update stayed resident (measured: one update, 40 MB at P=10M, through the round's close, which
    allocates the new model: 4x the model instead of 3x). A read-only shared mapping's pages are the page
    cache's: dropping them loses nothing, and a late reader faults them in again from the file."""
    if len(mapped) and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
