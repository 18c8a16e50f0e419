"""Where one site's incoming update lives between its first byte and the end of its fold.

A small update (the common case: a few MB to tens of MB) is received into memory, into a buffer reused
from the previous update: faulting in a fresh buffer costs more than the copy. At most one such buffer
is kept between updates.

A large one (over SPOOL_ABOVE_BYTES) is written to a file in the job store's incoming folder as it
arrives, then mapped read-only for the fold. With several upload slots, N updates of a 2 GB model
arriving at once would otherwise cost N x 2 GB of server memory; on disk they cost page cache, which the
kernel gives back under pressure. Folds run one at a time (the controller's fold lock), so the server's
memory holds one update at a time: the one being folded, mapped, unmapped as soon as its fold returns.
The server's peak is then about the global model, the aggregator's running sum and one update, at any
number of sites (docs/aggregation.md).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

from ..transport import PayloadReceiver

SPOOL_ABOVE_BYTES = 64 << 20
KEEP_BUFFERS = 1  # in-memory buffers kept for the next small update


class IncomingUpdate:
    """One update's receiver and, once complete, its bytes (a bytearray, or a read-only map of its file).

    `release()` always: it gives a small buffer back for reuse, or unmaps and deletes the spool file."""

    def __init__(self, declared_bytes: int, limit_bytes: int, sha256: str, spool_dir: Path,
                 free_buffers: list[bytearray], spool_above_bytes: int = SPOOL_ABOVE_BYTES):
        self._free = free_buffers
        self._declared = declared_bytes
        self._path: Path | None = None
        self._file = None
        self._map: mmap.mmap | None = None
        self._buffer: bytearray | None = None
        if declared_bytes > spool_above_bytes and declared_bytes <= limit_bytes:
            fd, name = tempfile.mkstemp(prefix="update-", suffix=".part", dir=spool_dir)  # 0600
            self._path, self._file = Path(name), os.fdopen(fd, "wb")
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
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._declared else None
        return self._map if self._map is not None else bytearray()

    def release(self) -> None:
        """Give the buffer back (at most KEEP_BUFFERS are kept), or unmap and delete the spool file."""
        if self._buffer is not None and len(self._free) < KEEP_BUFFERS:
            self._free.append(self._buffer)
        self._buffer = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of it is still referenced somewhere: unmapped when that goes
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
