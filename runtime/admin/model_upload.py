"""The console's side of `submit_job FOLDER --initial-model FILE`: a model too large for the job archive
(256 MiB cap) streamed from disk after it, a chunk at a time (runtime/server/initial_model_upload.py is
the server's side). The file is checked here first (safetensors header, finite values) so that a wrong
file fails in a second with its name, not after a gigabyte upload."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import FedkitError, UpdateRejected
from ..transport import CHUNK_BYTES


@dataclass(frozen=True)
class ModelToSend:
    path: Path
    size_bytes: int
    sha256: str

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes, read in a thread a chunk at a time (the console's loop keeps running)."""
        with open(self.path, "rb") as f:
            while piece := await asyncio.to_thread(f.read, CHUNK_BYTES):
                yield piece


def model_to_send(path: Path) -> ModelToSend:
    """Check `path` and hash it (blocking: call in a thread). FedkitError naming the file on a bad one."""
    from ..weights import check_file  # NumPy: only a submit that ships an initial model pays for it

    try:
        check_file(path)
    except UpdateRejected as e:
        raise FedkitError(f"--initial-model: {e}") from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            digest.update(piece)
    return ModelToSend(path, path.stat().st_size, digest.hexdigest())
