"""runtime/weights.py view_bytes, the server's zero-copy parser of untrusted update bytes, against the
reference safetensors reader on thousands of seeded random and adversarial payloads.

For every payload: view_bytes either returns exactly what the reference returns, or raises
UpdateRejected (never another exception); it accepts everything the reference accepts except dtypes
NumPy cannot hold (bf16, fp8); and it never accepts what the reference refuses.
"""

from __future__ import annotations

import json
import random

import ml_dtypes
import numpy as np
import pytest
from safetensors import deserialize
from safetensors.numpy import _TYPES as REFERENCE_TYPES
from safetensors.numpy import save

from runtime.errors import UpdateRejected
from runtime.weights import view_bytes

SEED = 20261201
CASES = 3000
SUPPORTED = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
         "I64": np.int64, "I32": np.int32,
         "U8": np.uint8, "BOOL": np.bool_}


def _valid(rng: random.Random) -> bytes:
    tensors = {}
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice(list(NUMPY.values()))
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 3)))
        data = np.frombuffer(rng.randbytes(int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype=np.uint8)
        if dtype is np.bool_:
            data = data % 2
        tensors[f"t{i}.{rng.choice(['weight', 'bias', 'x/y'])}"] = data.view(dtype).reshape(shape)
    return save(tensors, metadata={"format": "np"} if rng.random() < 0.3 else None)


def _split(payload: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]), payload[8 + n:]


def _join(header: object, data: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    """One adversarial change to a valid payload."""
    header, data = _split(payload)
    names = _tensor_names(header)
    kind = rng.randrange(16)
    if kind == 0:  # header length past the end, or short
        n = int.from_bytes(payload[:8], "little") + rng.choice([1, 7, len(payload), 2**40, 2**63])
        return (n % 2**64).to_bytes(8, "little") + payload[8:]
    if kind == 1:  # truncated or extended data
        return payload[:rng.randrange(len(payload) + 1)] if rng.random() < 0.5 else payload + rng.randbytes(3)
    if kind == 2 and names:  # shifted, overlapping or reversed offsets
        info = header[rng.choice(names)]
        a, b = info["data_offsets"]
        info["data_offsets"] = rng.choice([[a + 1, b + 1], [0, b], [b, a], [a, b + 4], [a - 1, b]])
        return _join(header, data)
    if kind == 3 and names:  # shapes that do not fit, or whose product overflows 64 bits
        header[rng.choice(names)]["shape"] = rng.choice([[-1], [2**62, 2**62], [2**64], [1.0], [True],
                                                          ["2"], None, 3, [[1]]])
        return _join(header, data)
    if kind == 4 and names:  # unknown, unsupported or mistyped dtypes
        header[rng.choice(names)]["dtype"] = rng.choice(["F8_E5M2", "F8_E4M3", "C64", "f32", "", None, 5, ["F32"]])
        return _join(header, data)
    if kind == 5:  # header bytes that are not UTF-8 JSON
        raw = json.dumps(header).encode()
        i = rng.randrange(max(1, len(raw)))
        return _join(None, data, raw[:i] + bytes([rng.choice([0xFF, 0xC0, 0x80, 0x00])]) + raw[i + 1:])
    if kind == 6 and names:  # a duplicated name in the raw JSON
        name = rng.choice(names)
        raw = json.dumps(header).encode()
        return _join(None, data, raw[:-1] + b", " + json.dumps({name: header[name]}).encode()[1:])
    if kind == 7:  # header that is not an object
        return _join(rng.choice([[], "x", 1, None, [header]]), data)
    if kind == 8 and names:  # malformed entries
        header[rng.choice(names)] = rng.choice([None, [], "F32", {"dtype": "F32"}, {"shape": [], "dtype": "U8"}])
        return _join(header, data)
    if kind == 9 and names:  # data_offsets of the wrong arity or type
        header[rng.choice(names)]["data_offsets"] = rng.choice([[0], [0, 1, 2], "0,1", [0.0, 4.0], [-8, 0],
                                                                [2**64, 2**64 + 4]])
        return _join(header, data)
    if kind == 10:  # metadata of the wrong type
        header["__metadata__"] = rng.choice([{"k": 1}, [], "meta", {"k": None}, {"k": "v"}])
        return _join(header, data)
    if kind == 11:  # deep nesting in the header
        return _join(None, data, b"[" * 100_000 + b"]" * 100_000)
    if kind == 12 and len(names) >= 2:  # two tensors swap their offsets
        x, y = rng.sample(names, 2)
        header[x]["data_offsets"], header[y]["data_offsets"] = header[y]["data_offsets"], header[x]["data_offsets"]
        return _join(header, data)
    if kind == 13:  # random bytes
        return rng.randbytes(rng.randrange(64))
    if kind == 14:  # header padded with spaces (valid in the format)
        return _join(None, data, json.dumps(header).encode() + b" " * rng.randrange(1, 9))
    return payload


def _mutate_again(rng: random.Random, payload: bytes) -> bytes:
    """A mutation of a payload that may already be broken (then some mutations do not apply)."""
    try:
        return _mutate(rng, payload)
    except (TypeError, KeyError, ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return payload


def _outcome(parse, payload: bytes) -> dict[str, np.ndarray] | None:
    try:
        return parse(payload)
    except UpdateRejected:
        return None


def reference_load(payload: bytes) -> dict[str, np.ndarray]:
    """safetensors' own parser (its Rust core), with its NumPy loader's dtype table plus bfloat16 as the
    ml_dtypes dtype fedkit carries it in (the NumPy loader has no bfloat16 of its own)."""
    types = {**REFERENCE_TYPES, "BF16": ml_dtypes.bfloat16}
    return {k: np.frombuffer(v["data"], dtype=types[v["dtype"]]).reshape(v["shape"]) for k, v in deserialize(payload)}


def _reference(payload: bytes) -> dict[str, np.ndarray] | None:
    try:
        return reference_load(payload)
    except Exception:
        return None


def _uses_unsupported_dtype(payload: bytes) -> bool:
    try:
        header, _ = _split(payload)
        return any(isinstance(v, dict) and v.get("dtype") not in SUPPORTED
                   for k, v in header.items() if k != "__metadata__")
    except Exception:
        return False


def _same(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> bool:
    return set(ours) == set(ref) and all(
        ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and ours[k].tobytes() == ref[k].tobytes()
        for k in ref)


def test_view_bytes_agrees_with_the_reference_reader_on_random_and_hostile_payloads() -> None:
    rng = random.Random(SEED)
    accepted = refused = 0
    for case in range(CASES):
        payload = _valid(rng)
        for _ in range(rng.choice([0, 1, 1, 2])):
            payload = _mutate_again(rng, payload)
        ours = _outcome(lambda p: view_bytes(bytearray(p)), payload)  # any other exception fails the test
        ref = _reference(payload)
        if ours is not None:
            accepted += 1
            assert ref is not None, f"case {case}: view_bytes accepted what the reference refuses: {payload[:200]!r}"
            assert _same(ours, ref), f"case {case}: view_bytes read other values than the reference"
        else:
            refused += 1
            assert ref is None or _uses_unsupported_dtype(payload), \
                f"case {case}: view_bytes refused what the reference reads: {payload[:200]!r}"
    assert accepted > CASES // 10 and refused > CASES // 10  # the generator exercises both sides


@pytest.mark.parametrize("payload, reason", [
    (b"\x05\x00", "shorter than its header length"),
    ((2**63).to_bytes(8, "little") + b"{}", "exceeds the payload"),
    (_join(None, b"", b"\xff\xfe"), "header is not JSON"),
    (_join({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4),
     "offsets do not match"),
    (_join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "bytes after the last tensor"),
    (_join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "offsets do not match"),
    (_join({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 1), "unsupported dtype"),
    (_join({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "shape must be"),
])
def test_view_bytes_refuses_each_hostile_header_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        view_bytes(bytearray(payload))


def test_view_bytes_returns_views_into_the_buffer_without_copying() -> None:
    buf = bytearray(save({"w": np.arange(4, dtype=np.float32)}))

    w = view_bytes(buf)["w"]
    buf[-4:] = np.float32(42).tobytes()

    assert w[-1] == 42
