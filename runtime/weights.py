"""Model weights as they cross process and network boundaries: an ordered mapping name -> NumPy array,
serialized with safetensors. Never unpickles anything.

bfloat16 tensors are NumPy arrays of ml_dtypes' `bfloat16` dtype (NumPy has none of its own). Chosen over
raw uint16 arrays with the dtype carried on the side because the dtype then travels with the array through
every function: an aggregator that forgot about bfloat16 would average uint16 bit patterns silently, while
with ml_dtypes `astype(np.float64)` just works; it maps to safetensors' "BF16" both ways and to torch's
bfloat16 without copying (torch_weights). `is_float_dtype` is the one test of "a float tensor" in fedkit:
bfloat16's NumPy kind is "V", not "f".

ml_dtypes is imported only when a bfloat16 tensor is read or `BFLOAT16` is asked for: with NumPy 2.4 its
import registers ufunc loops for about 1.6 CPU-seconds, which every training worker (one per job and site)
and every other process paid at start whether or not its model held a bfloat16 tensor. The dtype tests
below go by the dtype's name, so they need no import: a "bfloat16" dtype exists only once ml_dtypes made it.

Also the checks an incoming update must pass before it may touch the global model.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from safetensors.numpy import save as _st_save

from .errors import UpdateRejected
from .plain_text import shown
from .safetensors_header import MAX_HEADER_BYTES

Weights = dict[str, np.ndarray]

_BFLOAT16_NAME = "bfloat16"
MAX_NAME_SHOWN = 80


def _named(name: str) -> str:
    """A tensor's name as an error quotes it: the sender chose it (a job's code, a site), so bounded and with
    its control characters escaped; the error reaches logs and admins' terminals."""
    return shown(name[:MAX_NAME_SHOWN]) + ("..." if len(name) > MAX_NAME_SHOWN else "")


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported on first use (see the module docstring)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def __getattr__(name: str) -> object:
    # BFLOAT16 and HALF_DTYPES stay importable by name; only asking for them imports ml_dtypes
    if name == "BFLOAT16":
        return bfloat16()
    if name == "HALF_DTYPES":
        return (np.dtype(np.float16), bfloat16())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.name == _BFLOAT16_NAME and dtype.kind == "V"


def is_half_dtype(dtype: np.dtype) -> bool:
    """float16 or bfloat16: the tensors computed in float32 (`wide_dtype`)."""
    return dtype == np.float16 or is_bfloat16(dtype)


def is_float_dtype(dtype: np.dtype) -> bool:
    """float16, bfloat16, float32, float64: the tensors that training moves, optimizers step and filters
    perturb (integer buffers such as num_batches_tracked are not)."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def wide_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype to compute in for a float tensor of `dtype`: float32 for half types (sums, norms and noise
    in float16/bfloat16 lose most of their digits or overflow), the tensor's own dtype otherwise."""
    return np.dtype(np.float32) if is_half_dtype(dtype) else np.dtype(dtype)


def to_bytes(weights: Weights) -> bytes:
    """Serialize to safetensors bytes."""
    return _st_save(_contiguous(weights))


def from_bytes(data: bytes | bytearray | memoryview) -> Weights:
    """Parse safetensors bytes into arrays that own their (writable) data; raise UpdateRejected on anything
    malformed. One copy of the data, into a buffer the arrays share (safetensors' NumPy loader knows no
    bfloat16, so `view_bytes` parses)."""
    try:
        return view_bytes(bytearray(data))
    except UpdateRejected as e:
        raise UpdateRejected(f"{_INVALID}: {_reason(e)}") from None


_INVALID = "not a valid safetensors payload"


def _reason(error: UpdateRejected) -> str:
    return str(error).removeprefix(f"{_INVALID}: ")


# safetensors dtype names -> NumPy ("BF16": ml_dtypes' bfloat16, looked up on first use by `bfloat16()`)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def view_bytes(buf: bytearray | bytes | mmap.mmap) -> Weights:
    """Read safetensors bytes as NumPy views into `buf`, without copying tensor data.

    The server receives every update into one buffer; safetensors' own `load` would copy it twice more.
    The format is an 8-byte little-endian header length, a JSON header of name -> {dtype, shape,
    data_offsets}, then the data. This parser accepts exactly what the reference reader accepts (the
    tensors tile the data with no gap or overlap; shapes and offsets are non-negative JSON integers),
    except dtypes NumPy cannot hold; anything else raises UpdateRejected with the reason. It allocates
    nothing in proportion to what the header claims, only to what was received.
    """
    if len(buf) < 8:
        raise UpdateRejected("not a valid safetensors payload: shorter than its header length")
    n_header = int.from_bytes(buf[:8], "little")
    if n_header > min(MAX_HEADER_BYTES, len(buf) - 8):
        raise UpdateRejected(f"not a valid safetensors payload: header length {n_header} exceeds the payload")
    try:
        header = json.loads(bytes(buf[8:8 + n_header]))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UpdateRejected("not a valid safetensors payload: header is not JSON") from None
    if not isinstance(header, dict):
        raise UpdateRejected("not a valid safetensors payload: header is not an object")
    start, size = 8 + n_header, len(buf) - 8 - n_header
    entries = sorted(_header_entry(name, info) for name, info in header.items() if name != "__metadata__")
    _check_metadata(header.get("__metadata__"))
    out: Weights = {}
    covered = 0
    for begin, end, name, dtype, shape in entries:
        count = math.prod(shape)
        if begin != covered or end - begin != count * dtype.itemsize or end > size:
            raise UpdateRejected(f"tensor '{_named(name)}': its offsets do not match its shape and dtype")
        covered = end
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    if covered != size:
        raise UpdateRejected(f"not a valid safetensors payload: {size - covered} bytes after the last tensor")
    return out


def check_file(path: Path, chunk_bytes: int = 16 << 20, values: bool = True) -> int:
    """Check a safetensors file the size of a large model without reading it into memory: the header as
    `view_bytes` checks it (the tensors tile the data exactly) and, with `values`, reading at most
    `chunk_bytes` at a time, that every float tensor is finite. Returns the number of tensors; raises
    UpdateRejected naming the file and what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n_header = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n_header < 0 or n_header > min(MAX_HEADER_BYTES, size - 8):
                raise UpdateRejected(f"{path}: not a valid safetensors file: bad header length")
            header = json.loads(f.read(n_header))
            if not isinstance(header, dict):
                raise UpdateRejected(f"{path}: not a valid safetensors file: header is not an object")
            _check_metadata(header.get("__metadata__"))
            entries = sorted(_header_entry(k, v) for k, v in header.items() if k != "__metadata__")
            covered, start = 0, 8 + n_header
            for begin, end, name, dtype, shape in entries:
                if begin != covered or end - begin != math.prod(shape) * dtype.itemsize:
                    raise UpdateRejected(f"tensor '{_named(name)}': its offsets do not match its shape and dtype")
                covered = end
            if covered != size - start:
                raise UpdateRejected(f"{size - start - covered} bytes after the last tensor, or tensors past "
                                     "the end of the file")
            for begin, end, name, dtype, _ in entries if values else ():
                if is_float_dtype(dtype) and not _file_range_finite(f, start + begin, end - begin, dtype,
                                                                    chunk_bytes):
                    raise UpdateRejected(f"{path}: tensor '{_named(name)}' holds NaN or Inf")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UpdateRejected(f"{path}: not a valid safetensors file: header is not JSON") from None
    except OSError as e:
        raise UpdateRejected(f"{path}: cannot read the model file: {e.strerror}") from None
    except UpdateRejected as e:
        message = str(e)
        raise UpdateRejected(message if message.startswith(str(path)) else
                             f"{path}: not a valid safetensors file: {_reason(e)}") from None
    return len(entries)


def _file_range_finite(f, offset: int, n_bytes: int, dtype: np.dtype, chunk_bytes: int) -> bool:
    step = max(dtype.itemsize, chunk_bytes - chunk_bytes % dtype.itemsize)
    f.seek(offset)
    for _ in range(0, n_bytes, step):
        piece = f.read(min(step, n_bytes))
        n_bytes -= len(piece)
        if not all_finite(np.frombuffer(piece, dtype=dtype)):
            return False
    return True


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # JSON integers only: not bools, floats or strings


def _header_entry(name: str, info: object) -> tuple[int, int, str, np.dtype, tuple[int, ...]]:
    """(begin, end, name, dtype, shape) of one header entry, each field checked."""
    if not isinstance(info, dict):
        raise UpdateRejected(f"tensor '{_named(name)}': malformed entry in the header")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UpdateRejected(f"tensor '{_named(name)}': unsupported dtype {str(dtype)[:16]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise UpdateRejected(f"tensor '{_named(name)}': shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise UpdateRejected(f"tensor '{_named(name)}': data_offsets must be two non-negative integers")
    numpy_dtype = bfloat16() if dtype == "BF16" else np.dtype(_DTYPES[dtype])
    return offsets[0], offsets[1], name, numpy_dtype, tuple(shape)


def _check_metadata(metadata: object) -> None:
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise UpdateRejected("not a valid safetensors payload: __metadata__ must map strings to strings")


def save_file(weights: Weights, path: Path, reuse: Path | None = None) -> None:
    """Atomic (temp file, rename), written from the arrays' memory without a serialized copy; with `reuse`,
    written over that file and linked as `path` (model_bytes.write_safetensors)."""
    from .model_bytes import write_safetensors  # it builds on this module

    write_safetensors(weights, path, over=reuse, keep_over=reuse is not None)


def load_file(path: Path) -> Weights:
    """Read a safetensors file into memory (one buffer the arrays share: a 1 GiB model costs 1 GiB)."""
    return _file_weights(path, _read_whole)


def map_file(path: Path) -> Weights:
    """A safetensors file as writable arrays over a private (copy-on-write) map of it: the pages are the
    page cache's, and a page is copied only when written, so a learner that only reads the model holds no
    copy of it. `load_file` zeroes a buffer the size of the file and copies the file into it. For a file
    nobody truncates while it is mapped (a read past a truncated end kills the process with SIGBUS): a
    training worker's received model, which only its site daemon writes, by rename."""
    return _file_weights(path, _map_private)


def _file_weights(path: Path, contents: Callable[[BinaryIO], bytearray | mmap.mmap]) -> Weights:
    """view_bytes of `contents(the open file)`; either step's failure as UpdateRejected naming the file."""
    try:
        with open(path, "rb") as f:
            data = contents(f)
    except OSError as e:
        raise UpdateRejected(f"{path}: cannot read the model file: {e.strerror}") from None
    try:
        return view_bytes(data)
    except UpdateRejected as e:
        raise UpdateRejected(f"{path}: not a valid safetensors file: {_reason(e)}") from None


def _read_whole(f: BinaryIO) -> bytearray:
    buf = bytearray(os.fstat(f.fileno()).st_size)
    del buf[f.readinto(buf):]
    return buf


def _map_private(f: BinaryIO) -> bytearray | mmap.mmap:
    size = os.fstat(f.fileno()).st_size
    if not size:  # an empty file cannot be mapped; view_bytes says what is wrong with it
        return bytearray()
    # no MAP_POPULATE: on a writable private map it copies every page up front (40 MB: 25 ms, against 3 ms
    # to read the map lazily here), which is the copy this map exists to avoid
    return mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)  # the map outlives the descriptor


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def nbytes(weights: Weights) -> int:
    return sum(int(a.nbytes) for a in weights.values())


def _contiguous(weights: Weights) -> Weights:
    # ascontiguousarray would turn a 0-d tensor into shape (1,); leave contiguous ones as they are
    return {k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in weights.items()}


def check_update(update: Weights, reference: Weights) -> None:
    """Refuse an update that cannot be folded into `reference` (the global model).

    Names must be a subset of the model's (a site may leave variables out, e.g. by a privacy filter);
    each tensor must match the model's shape and dtype and be all finite.
    Raises UpdateRejected naming the first offending tensor.
    """
    if not update:
        raise UpdateRejected("update holds no tensors")
    for name, arr in update.items():
        ref = reference.get(name)
        if ref is None:
            raise UpdateRejected(f"unknown tensor '{_named(name)}' (not in the global model)")
        if arr.shape != ref.shape:
            raise UpdateRejected(f"tensor '{_named(name)}' has shape {arr.shape}, model has {ref.shape}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected(f"tensor '{_named(name)}' has dtype {arr.dtype}, model has {ref.dtype}")
        if is_float_dtype(arr.dtype) and not all_finite(arr):
            raise UpdateRejected(f"tensor '{_named(name)}' holds NaN or Inf")
        drop_read_pages(arr)  # checked: a spooled update is not all resident before its fold


def drop_read_pages(arr: np.ndarray) -> None:
    """When `arr` is a view of a mapped file (the server's spooled updates, runtime/server/update_spool.py)
    and has just been read, take its pages out of this process's resident memory, so that checking and
    folding an update holds one tensor of it at a time, not the whole update beside the model and the sum.
    Nothing is lost: a later read faults the pages in again from the page cache. Any other array: a no-op."""
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapped, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or not arr.nbytes:
        return
    offset = arr.ctypes.data - np.frombuffer(mapped, np.uint8, count=1).ctypes.data
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: the edges may hold a neighbour
    end = (offset + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


def drop_model_pages(weights: Weights) -> None:
    """`drop_read_pages` for every tensor: a model read from a map of its file leaves this process's
    resident memory (all but the pages two tensors share)."""
    for arr in weights.values():
        drop_read_pages(arr)


FINITE_CHUNK = 1 << 20  # elements checked at once: a 1 MiB bool temporary, never one the size of the tensor


def all_finite(arr: np.ndarray) -> bool:
    # isfinite a chunk at a time: one vectorized pass with a small temporary. (A float64 sum, which NaN and
    # Inf would propagate into, measured 30x slower: NumPy casts every float32 through a buffer.)
    flat = arr.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.size, FINITE_CHUNK))
