"""The server's side of a large initial model sent beside a job archive: the header's announcement is
checked against the caps before anything is read, the one data stream splits exactly into archive and
model, and a model that is short, long, altered on the way or not a valid finite safetensors file is
refused with no file left behind. And weights.check_file, which checks such a file a chunk at a time."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import JobRejected, UpdateRejected
from runtime.server.initial_model_upload import announced, spool_both
from runtime.weights import BFLOAT16, check_file, save_file, to_bytes

ARCHIVE = b"PK-pretend-zip" * 1000


def _model_bytes(values: np.ndarray | None = None) -> bytes:
    w = values if values is not None else np.linspace(-1, 1, 50_000).astype(BFLOAT16)
    return to_bytes({"w": w, "n": np.array(3, np.int64), "b": np.ones(7, np.float16)})


def _args(model: bytes, archive: bytes = ARCHIVE, **changes) -> dict:
    args = {"archive_bytes": len(archive),
            "initial_model": {"bytes": len(model), "sha256": hashlib.sha256(model).hexdigest()}}
    args.update(changes)
    return args


async def _chunks(data: bytes, size: int) -> object:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _spool(data: bytes, args: dict, folder: Path, chunk: int = 4096):
    return asyncio.run(spool_both(_chunks(data, chunk), announced(args, 1 << 20, 1 << 22), folder))


@pytest.mark.parametrize("chunk", [1, 999, 4096, 1 << 20])
def test_the_stream_splits_into_the_archive_and_the_model_at_any_chunking(tmp_path, chunk) -> None:
    model = _model_bytes()
    data = ARCHIVE + model if chunk > 1 else ARCHIVE[:50] + model[:50]
    args = _args(model) if chunk > 1 else _args(model[:50], ARCHIVE[:50])
    if chunk == 1:  # the byte-by-byte case on a small stream; the model part is only checked for its hash
        with pytest.raises(JobRejected, match="initial model: .*safetensors"):
            _spool(data, args, tmp_path, chunk)
        assert list(tmp_path.iterdir()) == []
        return
    archive, stored = _spool(data, args, tmp_path, chunk)
    assert archive.path.read_bytes() == ARCHIVE and stored.path.read_bytes() == model
    assert stored.sha256 == hashlib.sha256(model).hexdigest()


@pytest.mark.parametrize("cut, extra, match", [
    (10, b"", "upload ended 10 bytes short"),
    (0, b"more", "more data than the header announced"),
])
def test_a_model_shorter_or_longer_than_announced_is_refused_and_nothing_is_left(tmp_path, cut, extra, match):
    model = _model_bytes()
    data = (ARCHIVE + model)[:len(ARCHIVE) + len(model) - cut] + extra
    with pytest.raises(JobRejected, match=match):
        _spool(data, _args(model), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_model_altered_on_the_way_is_refused(tmp_path) -> None:
    model = _model_bytes()
    altered = bytearray(model)
    altered[-1] ^= 0x01
    with pytest.raises(JobRejected, match="SHA-256 is not the one announced"):
        _spool(ARCHIVE + bytes(altered), _args(model), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_nan_is_refused_by_name(tmp_path) -> None:
    w = np.zeros(1000, BFLOAT16)
    w[999] = np.nan
    model = _model_bytes(w)
    with pytest.raises(JobRejected, match="initial model: tensor 'w' holds NaN or Inf"):
        _spool(ARCHIVE + model, _args(model), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, match", [
    ({"archive_bytes": (1 << 20) + 1}, "job archive larger than"),
    ({"initial_model": {"bytes": (1 << 22) + 1, "sha256": "0" * 64}}, "larger than this server accepts"),
    ({"initial_model": {"bytes": -1, "sha256": "0" * 64}}, "must be {bytes: N, sha256: HEX}"),
    ({"initial_model": {"bytes": 10, "sha256": "xyz"}}, "must be {bytes: N, sha256: HEX}"),
    ({"archive_bytes": "12"}, "needs 'archive_bytes'"),
])
def test_the_announcement_is_checked_against_the_caps_before_any_data(change, match) -> None:
    with pytest.raises(JobRejected, match=match):
        announced(_args(_model_bytes(), **change), 1 << 20, 1 << 22)
    assert announced({"folder": "job"}, 1 << 20, 1 << 22) is None  # no model: the stream is the archive


def test_check_file_reads_a_model_in_chunks_and_finds_a_bad_value_in_any_chunk(tmp_path) -> None:
    w = np.zeros(100_000, np.float32)
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(3, np.int64), "w": w}, path)
    assert check_file(path, chunk_bytes=4096) == 2
    w[77_777] = np.inf
    save_file({"a": np.ones(3, np.int64), "w": w}, path)
    with pytest.raises(UpdateRejected, match=f"{path}: tensor 'w' holds NaN or Inf"):
        check_file(path, chunk_bytes=4096)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:-2], "after the last tensor|past the end"),
    (lambda b: b + b"\0\0", "after the last tensor"),
    (lambda b: b"\xff" * 8 + b[8:], "bad header length"),
    (lambda b: b[:8] + b"[" + b[9:], "header is not JSON"),
])
def test_check_file_refuses_a_damaged_file_with_its_name_and_reason(tmp_path, damage, match) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(damage(_model_bytes()))
    with pytest.raises(UpdateRejected, match=f"{path}: .*({match})"):
        check_file(path)
