"""runtime/weights.py: safetensors (de)serialization and the checks an incoming update must pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.errors import UpdateRejected
from runtime.weights import check_update, from_bytes, load_file, map_file, save_file, to_bytes


def _mixed() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "half": np.array([0.5, -1.25, 65504.0], dtype=np.float16),
        "steps": np.array([1, -2, 2**40], dtype=np.int64),
        "f64": np.array([[3.5]], dtype=np.float64),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr)


def test_bytes_round_trip_keeps_values_shapes_and_dtypes() -> None:
    weights = _mixed()

    restored = from_bytes(to_bytes(weights))

    _assert_same(restored, weights)


def test_bytes_round_trip_from_bytearray_and_memoryview() -> None:
    data = to_bytes(_mixed())

    _assert_same(from_bytes(bytearray(data)), _mixed())
    _assert_same(from_bytes(memoryview(data)), _mixed())


def test_a_zero_dim_tensor_keeps_its_shape() -> None:
    # torch stores e.g. BatchNorm's num_batches_tracked as a 0-d tensor
    weights = {"num_batches_tracked": np.array(7, dtype=np.int64), "temperature": np.array(0.5, dtype=np.float32)}

    restored = from_bytes(to_bytes(weights))

    _assert_same(restored, weights)


def test_non_contiguous_arrays_serialize_as_their_values() -> None:
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T

    restored = from_bytes(to_bytes({"t": transposed}))

    np.testing.assert_array_equal(restored["t"], transposed)


@pytest.mark.parametrize("garbage", [b"", b"not safetensors at all", b"\xff" * 16, to_bytes(_mixed())[:-3]])
def test_from_bytes_on_garbage_raises_update_rejected(garbage: bytes) -> None:
    with pytest.raises(UpdateRejected, match="safetensors"):
        from_bytes(garbage)


def test_file_round_trip_leaves_no_temporary_behind(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"

    save_file(_mixed(), path)
    save_file({"only": np.ones(2, dtype=np.float32)}, path)  # overwrite

    _assert_same(load_file(path), {"only": np.ones(2, dtype=np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_mixed(), path)

    with pytest.raises(Exception):  # noqa: B017 - any error; what matters is the file afterwards
        save_file({"bad": np.array(["text"])}, path)

    _assert_same(load_file(path), _mixed())


def test_load_file_on_garbage_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"garbage")

    with pytest.raises(UpdateRejected, match="model.safetensors"):
        load_file(path)


def test_a_mapped_file_reads_as_loaded_and_writes_stay_in_the_process(tmp_path: Path) -> None:
    """A training worker reads its received model through a private map: the learner gets the same
    arrays, writable, and what it writes never reaches the site daemon's file."""
    path = tmp_path / "model.safetensors"
    save_file(_mixed(), path)
    on_disk = path.read_bytes()
    mapped = map_file(path)
    _assert_same(mapped, _mixed())
    mapped["conv.weight"] += 1.0
    mapped["steps"][0] = 7
    assert path.read_bytes() == on_disk
    _assert_same(map_file(path), _mixed())


def _private_copy_bytes(path: Path) -> int:
    """Bytes of this process's private copies of `path`'s pages: the Anonymous lines of its maps in smaps."""
    total, in_file = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
            in_file = line.rstrip().endswith(str(path))
        elif in_file and first == "Anonymous:":
            total += int(line.split()[1]) * 1024
    return total


def test_a_mapped_model_costs_the_worker_no_copy_until_it_writes(tmp_path: Path) -> None:
    """A learner that only reads the received model (most do: they load it into their own network) holds
    no private copy of it; a write copies only the pages written. The training worker's memory and its
    sandbox's memory cap then count the model once, not twice."""
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(4 << 20, np.float32), "b": np.ones(4 << 20, np.float32)}, path)  # 2 x 16 MiB
    mapped = map_file(path)
    assert float(mapped["a"].sum()) == 4 << 20 and float(mapped["b"].sum()) == 4 << 20
    assert _private_copy_bytes(path) < 1 << 20
    mapped["a"] += 1.0
    assert 16 << 20 <= _private_copy_bytes(path) < 17 << 20  # tensor a's pages, not b's
    assert float(mapped["b"].sum()) == 4 << 20


@pytest.mark.parametrize("content", [b"", b"garbage"])
def test_map_file_on_garbage_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UpdateRejected, match="model.safetensors"):
        map_file(path)


# ---- check_update ---------------------------------------------------------------------------------

MODEL = {
    "a": np.zeros((2, 2), dtype=np.float32),
    "b": np.zeros(3, dtype=np.float32),
    "count": np.zeros(1, dtype=np.int64),
}


def test_a_matching_update_passes() -> None:
    update = {k: np.ones_like(v) for k, v in MODEL.items()}

    check_update(update, MODEL)  # no exception


def test_a_subset_of_the_model_names_passes() -> None:
    check_update({"b": np.ones(3, dtype=np.float32)}, MODEL)  # no exception


def test_an_empty_update_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="no tensors"):
        check_update({}, MODEL)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"c": np.zeros(3, dtype=np.float32)}, "unknown tensor 'c'"),
        ({"b": np.zeros(4, dtype=np.float32)}, "'b' has shape"),
        ({"a": np.zeros(4, dtype=np.float32)}, "'a' has shape"),
        ({"b": np.zeros(3, dtype=np.float64)}, "'b' has dtype"),
        ({"count": np.zeros(1, dtype=np.int32)}, "'count' has dtype"),
        ({"b": np.array([0, np.nan, 0], dtype=np.float32)}, "'b' holds NaN or Inf"),
        ({"b": np.array([0, np.inf, 0], dtype=np.float32)}, "'b' holds NaN or Inf"),
        ({"b": np.array([-np.inf, 0, 0], dtype=np.float32)}, "'b' holds NaN or Inf"),
        ({"b": np.array([np.inf, -np.inf, 0], dtype=np.float32)}, "'b' holds NaN or Inf"),
    ],
    ids=["unknown", "shape", "rank", "dtype-float", "dtype-int", "nan", "inf", "neg-inf", "inf-minus-inf"],
)
def test_a_bad_update_is_rejected_naming_the_tensor(update: dict[str, np.ndarray], reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        check_update(update, MODEL)


def test_the_first_bad_tensor_is_named_even_after_good_ones() -> None:
    update = {"a": np.ones((2, 2), dtype=np.float32), "b": np.array([1, 2, np.nan], dtype=np.float32)}

    with pytest.raises(UpdateRejected, match="'b'"):
        check_update(update, MODEL)
