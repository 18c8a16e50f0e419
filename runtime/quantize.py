"""Wire codecs: what a model or an update is cast to for the trip over the network, and back.

A job picks one with `server.wire_dtype` (config_fed_server.yml); it travels to the sites in the task's
TaskConfig, so both directions use it: the server encodes the global model it sends, each site encodes the
delta it sends back (after its privacy filters: the codec is not a privacy measure), and the receiving
edge decodes before anything else sees the weights (the site's daemon before its worker, the server
before the workflow folds). Nothing but the bytes on the wire changes: models and aggregation stay in the
model's own dtype.

    float32    as is (the default)
    float16    IEEE half: 2 bytes a value; values past +-65504 become inf, and are refused as such
    bfloat16   the top 16 bits of float32, rounded to nearest even: float32's range, 8 bits of mantissa
    int8       8-bit blockwise: per block of BLOCK consecutive values one float32 scale (absmax / 127) and
               int8 codes; about 1.016 bytes a value, error at most half a step (absmax / 254) per block

An encoded file is an ordinary safetensors file whose float tensors are renamed to say how to decode
them (the dtype and, for int8, the block size are in the name), so a receiver needs no reference model:

    __fedkit_wire__/float16/<dtype>/<name>        float16 values
    __fedkit_wire__/bfloat16/<dtype>/<name>       uint16 (bfloat16 bit patterns)
    __fedkit_wire__/int8.<block>/<dtype>/<name>   int8 codes, the tensor's own shape
    __fedkit_wire__/scale.<block>/<name>          float32 scales, one per block

Tensors that are not floating point (step counters, masks) pass unchanged. A decoder treats its input as
hostile (a site's upload): every name, dtype, shape and scale is checked, and a bad one raises
UpdateRejected naming the tensor. The codecs are pure NumPy; `encode_file`/`decode_file` are the daemon's
edges.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from .errors import UpdateRejected
from .weights import load_file, save_file, to_bytes

Weights = dict[str, np.ndarray]
WireDtype = Literal["float32", "float16", "bfloat16", "int8"]
WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)
PREFIX = "__fedkit_wire__/"
BLOCK = 256
_BLOCKS = {64, 128, 256, 512, 1024, 2048, 4096}  # what a decoder accepts
_TARGETS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}  # dtypes decoded back to


@dataclass(frozen=True)
class WireError:
    """How far the decoded values are from the originals, over every float tensor: the largest absolute
    difference and the L2 norm of the difference relative to the originals' (0 when they are all 0)."""

    max_abs: float = 0.0
    rel_l2: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {"max_abs_error": self.max_abs, "rel_l2_error": self.rel_l2}


def is_encoded(weights: Weights) -> bool:
    return any(name.startswith(PREFIX) for name in weights)


def encode(weights: Weights, wire_dtype: str, block: int = BLOCK) -> tuple[Weights, WireError]:
    """`weights` as sent with `wire_dtype`, and the error its receiver will see after decoding."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, not {wire_dtype!r}")
    if wire_dtype == "float32":
        return weights, WireError()
    out: Weights = {}
    max_abs, err_sq, ref_sq = 0.0, 0.0, 0.0
    for name, arr in weights.items():
        if arr.dtype.kind != "f" or arr.dtype.name not in _TARGETS or arr.size == 0:
            out[name] = arr
            continue
        target = arr.dtype.name
        if wire_dtype == "float16":
            out[f"{PREFIX}float16/{target}/{name}"] = coded = arr.astype(np.float16)
            decoded = coded.astype(arr.dtype)
        elif wire_dtype == "bfloat16":
            out[f"{PREFIX}bfloat16/{target}/{name}"] = coded = _to_bf16_bits(arr)
            decoded = _from_bf16_bits(coded).astype(arr.dtype, copy=False)
        else:
            codes, scales = _int8_encode(arr, block)
            out[f"{PREFIX}int8.{block}/{target}/{name}"] = codes
            out[f"{PREFIX}scale.{block}/{name}"] = scales
            decoded = _int8_decode(codes, scales, block, arr.dtype)
        with np.errstate(all="ignore"):
            # in the tensor's own precision (float32 BLAS: fast, and plenty for a reported figure)
            diff = (decoded - arr).ravel()
            flat = arr.ravel()
            max_abs = max(max_abs, float(np.abs(diff).max()))
            err_sq += float(np.dot(diff, diff))
            ref_sq += float(np.dot(flat, flat))
    rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
    return out, WireError(max_abs=max_abs, rel_l2=rel)


def decode(weights: Weights) -> Weights:
    """The weights an encoded file stands for, in their own dtypes. Unencoded tensors pass unchanged.
    Raises UpdateRejected on anything that does not decode."""
    out: Weights = {}
    scales = {name: arr for name, arr in weights.items() if name.startswith(PREFIX + "scale.")}
    used: set[str] = set()
    for key, arr in weights.items():
        if not key.startswith(PREFIX):
            _put(out, key, arr)
            continue
        if key in scales:
            continue
        codec, _, rest = key[len(PREFIX):].partition("/")
        target, _, name = rest.partition("/")
        if target not in _TARGETS or not name:
            raise UpdateRejected(f"wire tensor '{key[:200]}': not a name the wire codecs write")
        dtype = np.dtype(_TARGETS[target])
        if codec == "float16":
            _expect(key, arr, np.float16)
            _put(out, name, arr.astype(dtype))
        elif codec == "bfloat16":
            _expect(key, arr, np.uint16)
            _put(out, name, _from_bf16_bits(arr).astype(dtype, copy=False))
        elif codec.startswith("int8."):
            block = _block(key, codec)
            scale_key = f"{PREFIX}scale.{block}/{name}"
            if scale_key not in scales:
                raise UpdateRejected(f"wire tensor '{name[:200]}': int8 codes without their scales")
            _expect(key, arr, np.int8)
            scale = scales[scale_key]
            _expect(scale_key, scale, np.float32)
            if scale.shape != (-(-arr.size // block),):
                raise UpdateRejected(f"wire tensor '{name[:200]}': {scale.size} scales for {arr.size} values "
                                     f"in blocks of {block}")
            if not np.isfinite(scale).all() or (scale < 0).any():
                raise UpdateRejected(f"wire tensor '{name[:200]}': scales must be finite and non-negative")
            _put(out, name, _int8_decode(arr, scale, block, dtype))
            used.add(scale_key)
        else:
            raise UpdateRejected(f"wire tensor '{key[:200]}': unknown wire codec {codec[:32]!r}")
    if unused := set(scales) - used:
        raise UpdateRejected(f"wire tensor '{sorted(unused)[0][:200]}': scales without int8 codes")
    return out


def _put(out: Weights, name: str, arr: np.ndarray) -> None:
    if name in out:
        raise UpdateRejected(f"tensor '{name[:200]}' appears twice (encoded and not)")
    out[name] = arr


def _expect(key: str, arr: np.ndarray, dtype: type) -> None:
    if arr.dtype != np.dtype(dtype):
        raise UpdateRejected(f"wire tensor '{key[:200]}' has dtype {arr.dtype}, its codec writes {np.dtype(dtype)}")


def _block(key: str, codec: str) -> int:
    text = codec.partition(".")[2]
    if not text.isdigit() or int(text) not in _BLOCKS:
        raise UpdateRejected(f"wire tensor '{key[:200]}': block size must be one of {sorted(_BLOCKS)}")
    return int(text)


def _to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _int8_encode(arr: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    flat = np.ascontiguousarray(arr, dtype=np.float32).ravel()
    n_blocks = -(-flat.size // block)
    padded = np.zeros(n_blocks * block, dtype=np.float32)
    padded[:flat.size] = flat
    blocks = padded.reshape(n_blocks, block)
    absmax = np.abs(blocks).max(axis=1)
    scales = (absmax / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(127), absmax, out=np.zeros_like(absmax), where=absmax > 0)
    codes = np.rint(blocks * inverse[:, None]).clip(-127, 127).astype(np.int8)
    return codes.ravel()[:flat.size].reshape(arr.shape), scales


def _int8_decode(codes: np.ndarray, scales: np.ndarray, block: int, dtype: np.dtype) -> np.ndarray:
    flat = codes.ravel()
    padded = np.zeros(scales.size * block, dtype=np.float32)
    padded[:flat.size] = flat
    values = (padded.reshape(scales.size, block) * scales[:, None]).ravel()[:flat.size]
    return values.reshape(codes.shape).astype(dtype, copy=False)


# ---- the edges: files as a site's daemon holds them ------------------------------------------------------

def decode_file(path: Path) -> None:
    """Replace an encoded model file (as received) by the model it stands for; a plain file stays as is."""
    weights = load_file(path)
    if is_encoded(weights):
        save_file(decode(weights), path)


def encode_file(path: Path, wire_dtype: str) -> tuple[Path, str, WireError]:
    """Write `path`'s weights encoded for the wire next to it; returns that file, its SHA-256 and the error."""
    encoded, error = encode(load_file(path), wire_dtype)
    data = to_bytes(encoded)
    out = path.with_name(path.name.removesuffix(".safetensors") + ".wire.safetensors")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out, hashlib.sha256(data).hexdigest(), error
