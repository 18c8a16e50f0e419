"""The global model is written once, straight from its arrays, and sent from that file a chunk at a time:
the bytes equal what safetensors itself reads back, a download in progress keeps its round's bytes when the
next round's file replaces the old one, and the server never holds the payload in memory."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file as st_load_file

from runtime.model_bytes import SerializedModel
from runtime.server.taskboard import FilePayload, file_payload
from runtime.weights import load_file, to_bytes


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
            "head.bias": rng.normal(size=5).astype(np.float16),
            "emb": rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16),
            "strided": rng.normal(size=(6, 4)).astype(np.float64).T}  # not C-contiguous


async def _collect(payload: FilePayload) -> bytes:
    return b"".join([bytes(chunk) async for chunk in payload.stream()])


def test_save_writes_a_safetensors_file_every_reader_agrees_on(tmp_path: Path) -> None:
    model = _model()
    saved = SerializedModel.save(model, tmp_path / "global.safetensors")
    data = (tmp_path / "global.safetensors").read_bytes()
    assert saved.nbytes == len(data) and saved.sha256 == hashlib.sha256(data).hexdigest()
    assert not saved.chunks  # nothing of the model kept in memory
    for name, arr in load_file(tmp_path / "global.safetensors").items():
        assert arr.dtype == model[name].dtype
        np.testing.assert_array_equal(arr, model[name])
    theirs = st_load_file(str(tmp_path / "global.safetensors"))  # the reference reader (no bfloat16)
    np.testing.assert_array_equal(theirs["conv.weight"], model["conv.weight"])
    np.testing.assert_array_equal(theirs["strided"], model["strided"])
    assert data == to_bytes(model)  # the same bytes safetensors' own writer makes
    again = SerializedModel.read(tmp_path / "global.safetensors")
    assert (again.nbytes, again.sha256) == (saved.nbytes, saved.sha256)
    for name, arr in again.weights().items():
        np.testing.assert_array_equal(arr, model[name])


def test_a_file_payload_streams_the_files_bytes_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    saved = SerializedModel.save({"w": np.arange(300_000, dtype=np.float32)}, path)
    payload = FilePayload(path, saved.nbytes, saved.sha256, chunk_bytes=64 << 10)
    chunks = asyncio.run(_chunks(payload))
    assert max(len(c) for c in chunks) == 64 << 10 and len(chunks) == -(-saved.nbytes // (64 << 10))
    assert b"".join(chunks) == path.read_bytes() == payload.read_all()
    assert file_payload(path).sha256 == saved.sha256


async def _chunks(payload: FilePayload) -> list[bytes]:
    return [bytes(chunk) async for chunk in payload.stream()]


def test_a_payload_keeps_its_rounds_bytes_when_the_next_round_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    first = SerializedModel.save({"w": np.zeros(50_000, np.float32)}, path)
    payload = FilePayload.of_model(first)
    SerializedModel.save({"w": np.ones(50_000, np.float32)}, path)  # round 2's model, by rename
    sent = asyncio.run(_collect(payload))
    assert hashlib.sha256(sent).hexdigest() == first.sha256


def test_a_file_that_changed_size_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    saved = SerializedModel.save({"w": np.zeros(10, np.float32)}, path)
    with pytest.raises(OSError, match="global.safetensors"):
        FilePayload(path, saved.nbytes + 1, saved.sha256)
