"""A model serialized once: the safetensors bytes of one global model, cut into wire-sized chunks, with
their SHA-256, and the file they were written to.

Before, every training round serialized the same global model three times: into the global file, into
the checkpoint, and into the bytes sent to the sites. Now the workflow serializes it once (`of`), writes
the global file from those chunks (`write`), the controller sends the very same chunks, and the
checkpoint refers to the file by hash instead of holding the model again (runtime/server/checkpoint.py).
So the bytes a site receives are, by construction, the bytes of the saved global model.

The chunks are `bytes`: the protobuf runtime (upb) refuses memoryviews for `bytes` fields, so a slice
would be copied at message construction anyway; cutting once here is the one copy that remains.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .weights import Weights, from_bytes, to_bytes

# transport.CHUNK_BYTES (not imported: that would pull grpc into the workflows); any size up to the
# transport's message cap works on the wire
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class SerializedModel:
    chunks: tuple[bytes, ...]
    nbytes: int
    sha256: str
    path: Path | None = None  # the file these bytes were last written to (or read from)

    @classmethod
    def of(cls, weights: Weights, chunk_bytes: int = CHUNK_BYTES) -> SerializedModel:
        """Serialize `weights` (one pass), chunk and hash it."""
        return cls._from_data(to_bytes(weights), chunk_bytes)

    @classmethod
    def read(cls, path: Path, chunk_bytes: int = CHUNK_BYTES) -> SerializedModel:
        """The bytes of a model file as they are on disk (no parse, no re-serialization)."""
        digest, chunks, total = hashlib.sha256(), [], 0
        with path.open("rb") as f:
            while piece := f.read(chunk_bytes):
                digest.update(piece)
                chunks.append(piece)
                total += len(piece)
        return cls(chunks=tuple(chunks), nbytes=total, sha256=digest.hexdigest(), path=path)

    @classmethod
    def _from_data(cls, data: bytes, chunk_bytes: int) -> SerializedModel:
        view = memoryview(data)
        chunks = tuple(bytes(view[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes))
        return cls(chunks=chunks, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def write(self, path: Path) -> SerializedModel:
        """Write the bytes to `path` atomically (temp file, fsync, rename); returns self with `path` set."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("wb") as f:
            f.writelines(self.chunks)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)  # a crash never leaves a half-written model under the real name
        return replace(self, path=path)

    def weights(self) -> Weights:
        """The model as writable arrays (a copy)."""
        return from_bytes(b"".join(self.chunks))
