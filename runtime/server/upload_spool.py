"""An admin's upload, streamed to a file in the job store's incoming folder and hashed on the way.

Holding a 256 MiB archive in memory (twice, once as chunks and once joined) for each of several
concurrent uploads is how a handful of admins run a server out of memory; on disk it costs a chunk.
The file is the caller's to move (into a job folder) or delete. Never reads the data back itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import JobRejected


@dataclass(frozen=True)
class Spooled:
    path: Path
    size_bytes: int
    sha256: str


def _open_temp(folder: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(suffix=".upload", dir=folder)
    return fd, Path(name)


async def spool(chunks: AsyncIterator[bytes], folder: Path, limit_bytes: int) -> Spooled:
    """Write `chunks` to a new file in `folder`; JobRejected (and no file left) past `limit_bytes`."""
    fd, path = await asyncio.to_thread(_open_temp, folder)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for data in chunks:
                size += len(data)
                if size > limit_bytes:
                    raise JobRejected(f"job archive larger than {limit_bytes} bytes; make the job folder smaller "
                                      "(data and large models do not belong in it)")
                digest.update(data)
                await asyncio.to_thread(f.write, data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Spooled(path, size, digest.hexdigest())
