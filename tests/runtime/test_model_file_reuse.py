"""The server replaces its global model file every round. The file replaced is kept as a spare and the
round after next is written over it (fresh page-cache pages cost far more than rewritten ones), but only
once nothing can read it any more: any other name (best.safetensors, a checkpoint reference), a map or an
open descriptor in the server (a download still sending that round's model) keeps its bytes as they were."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.model_bytes import SPARE_SUFFIX, SerializedModel, drop_spares, unread_elsewhere
from runtime.weights import load_file


def _model(value: float, n: int = 50_000) -> dict[str, np.ndarray]:
    return {"w": np.full(n, value, dtype=np.float32), "b": np.full(3, value, dtype=np.float32)}


def _save(path: Path, value: float, n: int = 50_000) -> SerializedModel:
    return SerializedModel.save(_model(value, n), path, keep_spare=True)


def test_the_replaced_file_is_kept_and_the_round_after_next_is_written_over_it(tmp_path: Path) -> None:
    path, spare = tmp_path / "global.safetensors", tmp_path / ("global.safetensors" + SPARE_SUFFIX)
    _save(path, 1.0)
    first = path.stat().st_ino
    _save(path, 2.0)
    assert spare.stat().st_ino == first and load_file(spare)["w"][0] == 1.0
    saved = _save(path, 3.0, n=1_000)  # smaller: nothing of the longer model written over may remain
    assert path.stat().st_ino == first
    assert path.stat().st_size == saved.nbytes
    np.testing.assert_array_equal(load_file(path)["w"], np.full(1_000, 3.0, dtype=np.float32))
    assert SerializedModel.read(path).sha256 == saved.sha256
    assert load_file(spare)["w"][0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global.safetensors", "global.safetensors" + SPARE_SUFFIX]
    drop_spares(tmp_path)  # the job ended: no model-sized file is left behind for nothing
    assert [p.name for p in tmp_path.iterdir()] == ["global.safetensors"]


def test_a_file_another_name_links_is_never_written_over(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    _save(path, 1.0)
    os.link(path, tmp_path / "best.safetensors")  # as the best model is kept
    _save(path, 2.0)
    _save(path, 3.0)
    assert load_file(tmp_path / "best.safetensors")["w"][0] == 1.0
    assert load_file(path)["w"][0] == 3.0


def test_a_file_this_process_holds_open_or_maps_is_never_written_over(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    sending = _save(path, 1.0)
    fd = os.open(path, os.O_RDONLY)  # a download of round 1's model, still in flight
    try:
        _save(path, 2.0)
        _save(path, 3.0)
        assert SerializedModel.read(Path(f"/proc/self/fd/{fd}")).sha256 == sending.sha256
    finally:
        os.close(fd)
    mapped_model = _save(path, 4.0).mapped()  # round 4's model, read through a map
    _save(path, 5.0)
    _save(path, 6.0)
    assert mapped_model["w"][0] == 4.0 and load_file(path)["w"][0] == 6.0


def test_unread_elsewhere_sees_links_descriptors_and_maps(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    assert unread_elsewhere(path)
    with path.open("rb"):
        assert not unread_elsewhere(path)
    assert unread_elsewhere(path)
    os.link(path, tmp_path / "g")
    assert not unread_elsewhere(path)
    (tmp_path / "g").unlink()
    model = SerializedModel.save(_model(1.0), tmp_path / "m")
    arrays = model.mapped()
    assert not unread_elsewhere(tmp_path / "m")
    del arrays
    assert not unread_elsewhere(tmp_path / "absent")
