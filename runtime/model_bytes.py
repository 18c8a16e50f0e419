"""A model serialized once: the safetensors file of one global model, with its size and SHA-256.

Before, every training round serialized the same global model three times: into the global file, into
the checkpoint, and into the bytes sent to the sites. Now the workflow writes the global file once
(`save`), the controller sends that file (runtime.server.taskboard.FilePayload reads it a chunk at a time),
and the checkpoint refers to the file by hash instead of holding the model again
(runtime/server/checkpoint.py). So the bytes a site receives are, by construction, the bytes of the saved
global model.

The bytes live on disk, not in memory: `save` writes the arrays' buffers straight into the file (no
serialized copy in between), hashing as it goes, and the workflow then reads its model through a map of
that file (`mapped`): pages of the page cache, resident in the server only while a round's close reads
them. A `SerializedModel` made in memory (`of`, for a model that has no file) keeps its chunks instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .file_reuse import held_here, open_over, sole_name
from .weights import Weights, is_bfloat16, to_bytes, view_bytes

# transport.CHUNK_BYTES (not imported: that would pull grpc into the workflows); any size up to the
# transport's message cap works on the wire
CHUNK_BYTES = 1 << 20
WRITE_BYTES = 16 << 20  # how much of a tensor is hashed and written at once
SPARE_SUFFIX = ".spare.tmp"  # a replaced model file kept to be written over (`SerializedModel.save`); .tmp:
                             # never part of a job's download

_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
          np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16",
          np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


@dataclass(frozen=True)
class SerializedModel:
    nbytes: int
    sha256: str
    path: Path | None = None        # the file holding these bytes (written, or read)
    chunks: tuple[bytes, ...] = ()  # only for a model serialized in memory (`of`), never for a file

    @classmethod
    def of(cls, weights: Weights, chunk_bytes: int = CHUNK_BYTES) -> SerializedModel:
        """Serialize `weights` in memory (one pass), chunk and hash it: for models small enough to hold twice."""
        data = to_bytes(weights)
        view = memoryview(data)
        chunks = tuple(bytes(view[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes))
        return cls(chunks=chunks, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def save(cls, weights: Weights, path: Path, keep_spare: bool = False) -> SerializedModel:
        """Write `weights` as a safetensors file at `path` atomically (temp file, fsync, rename), straight
        from the arrays' memory, hashing on the way; nothing the size of the model is allocated.

        With `keep_spare` (a file replaced every round: the global model), the file replaced is kept as
        `<name>.spare.tmp`, and the next save writes over it instead of a new file once nothing reads it
        any more: no other name links it (a checkpoint reference, best.safetensors) and this process
        neither maps it nor holds it open (a download still sending that round's model): pages the page
        cache holds cost a fraction of fresh ones (runtime/file_reuse.py)."""
        if not keep_spare:
            nbytes, sha256 = write_safetensors(weights, path, hash_bytes=True, fsync=True)
            return cls(nbytes=nbytes, sha256=sha256, path=path)
        spare = path.with_name(path.name + SPARE_SUFFIX)
        replaced = path.with_name(path.name + ".replaced.tmp")
        replaced.unlink(missing_ok=True)
        try:
            os.link(path, replaced)  # the model now at `path` stays on disk: the next save's spare
        except FileNotFoundError:
            pass
        try:
            over = spare if unread_elsewhere(spare) else None
            nbytes, sha256 = write_safetensors(weights, path, hash_bytes=True, fsync=True, over=over)
        except BaseException:
            replaced.unlink(missing_ok=True)
            raise
        if replaced.exists():
            replaced.replace(spare)  # a spare not written over goes now (unlinked: a reader keeps its bytes)
        return cls(nbytes=nbytes, sha256=sha256, path=path)

    @classmethod
    def read(cls, path: Path, chunk_bytes: int = WRITE_BYTES) -> SerializedModel:
        """A model file as it is on disk (hashed a chunk at a time; nothing kept in memory)."""
        digest, total = hashlib.sha256(), 0
        with path.open("rb") as f:
            while piece := f.read(chunk_bytes):
                digest.update(piece)
                total += len(piece)
        return cls(nbytes=total, sha256=digest.hexdigest(), path=path)

    def write(self, path: Path) -> SerializedModel:
        """Write the bytes to `path` atomically (temp file, fsync, rename); returns self with `path` set."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("wb") as f:
            if self.chunks or self.path is None:
                f.writelines(self.chunks)
            else:
                with self.path.open("rb") as src:
                    while piece := src.read(WRITE_BYTES):
                        f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return replace(self, path=path, chunks=())

    def mapped(self) -> Weights:
        """The model as read-only arrays over a map of its file, read in place: nothing is resident until
        it is read, and `weights.drop_model_pages` takes what was read out of this process again (the
        page cache keeps it). A model serialized in memory: `weights()`. The file must not change while
        mapped; fedkit replaces a model file by rename, and writes over a replaced one only once nothing
        maps it (`save`'s keep_spare)."""
        if self.chunks or self.path is None:
            return self.weights()
        with self.path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the descriptor
        if len(mapped) != self.nbytes:
            raise OSError(f"{self.path}: {len(mapped)} bytes, {self.nbytes} expected (the file changed)")
        return view_bytes(mapped)

    def weights(self) -> Weights:
        """The model as writable arrays sharing one buffer: one copy of the bytes, read in place."""
        if self.chunks or self.path is None:
            return view_bytes(bytearray(b"".join(self.chunks)))
        buf = bytearray(self.nbytes)
        with self.path.open("rb") as f:
            got = f.readinto(buf)
        if got != self.nbytes:
            raise OSError(f"{self.path}: {got} of {self.nbytes} bytes read (the file changed)")
        return view_bytes(buf)


def write_safetensors(weights: Weights, path: Path, *, hash_bytes: bool = False, fsync: bool = False,
                      over: Path | None = None, keep_over: bool = False) -> tuple[int, str]:
    """Write `weights` as a safetensors file (the bytes safetensors' own writer makes) at `path`, through a
    temp file renamed into place, straight from the arrays' memory: safetensors' writer first copies every
    tensor into one bytes object, so a 2 GB model would cost 2 GB more to save. Returns (size, SHA-256 or
    "" when not `hash_bytes`).

    With `over`, the bytes are written over that file (made if absent) instead of a new temp file, then
    renamed to `path`, or with `keep_over` linked as `path` and kept under its name for the next write
    (runtime/file_reuse.py). Only for a file nothing reads any more: the training worker's last result (its
    daemon copied it), the server's spare global file (`SerializedModel.save`)."""
    arrays = {name: np.ascontiguousarray(arr) if not arr.flags.c_contiguous else arr
              for name, arr in weights.items()}
    header_bytes = _header(arrays)
    digest = hashlib.sha256(header_bytes) if hash_bytes else None
    total = len(header_bytes)
    tmp = over or path.with_suffix(path.suffix + ".tmp")
    with open_over(tmp) if over else tmp.open("wb") as f:
        f.write(header_bytes)
        for name in _order(arrays):
            flat = memoryview(arrays[name].reshape(-1).view(np.uint8))
            for start in range(0, len(flat), WRITE_BYTES):
                piece = flat[start:start + WRITE_BYTES]
                if digest is not None:
                    digest.update(piece)
                f.write(piece)
            total += len(flat)
        f.truncate()
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if keep_over:
        path.unlink(missing_ok=True)
        os.link(tmp, path)  # the complete file appears under its name at once, as by rename
    else:
        tmp.replace(path)  # a crash never leaves a half-written model under the real name
    return total, digest.hexdigest() if digest is not None else ""


def _order(arrays: Weights) -> list[str]:
    """safetensors' own order: larger alignments first, then by name."""
    return sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))


def _header(arrays: Weights) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to 8 bytes) of the file `save` writes."""
    header, offset = {}, 0
    for name in _order(arrays):
        arr = arrays[name]
        dtype_name = "BF16" if is_bfloat16(arr.dtype) else _NAMES.get(arr.dtype)
        if dtype_name is None:
            raise TypeError(f"tensor '{name}': dtype {arr.dtype} cannot be saved as safetensors")
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def drop_spares(folder: Path) -> None:
    """Delete the spare model files `SerializedModel.save` kept in `folder` (its job ended or stopped); never
    raises (it runs as a job ends, whose outcome it must not replace)."""
    for spare in folder.glob("*" + SPARE_SUFFIX):
        with contextlib.suppress(OSError):
            spare.unlink(missing_ok=True)


def unread_elsewhere(path: Path) -> bool:
    """Whether `path` is a regular file that nothing but this name reaches: one link, and neither mapped
    nor open in this process (False when unsure)."""
    info = sole_name(path)
    return info is not None and not held_here(info.st_ino)
