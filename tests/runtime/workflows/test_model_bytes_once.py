"""The global model is serialized once per round: the bytes every site is sent are the bytes of the saved
global file, and the checkpoint refers to those bytes (by hash) instead of writing the model again."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from runtime.job_spec import load_job_spec
from runtime.model_bytes import SerializedModel
from runtime.server.checkpoint import CHECKPOINT_FILE, REFS_KEY, CheckpointUnreadable, load_checkpoint
from runtime.server.taskboard import TaskBoard
from runtime.simulate import simulate
from tests.runtime.workflows.numpy_learner import learners


def _spec(rounds: int):
    return load_job_spec({"meta.yml": "name: sim\nmin_clients: 2", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": f"rounds: {rounds}\n"
                                                   "key_metric: {name: mse, higher_is_better: false}"})


def test_the_model_bytes_sent_are_the_saved_global_model_and_the_checkpoints(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server = tmp_path / "server"
    models = server / "simulated" / "models"
    sent: list[tuple[str, bytes, bytes]] = []  # (task, bytes sent, the global file's bytes when sent)
    checkpoints: list[tuple[dict, bytes]] = []   # (the checkpoint's references, the global file) when sent
    post = TaskBoard.post

    def watching_post(board: TaskBoard, task) -> None:
        if task.payload.nbytes:
            wire = task.payload.read_all()
            assert hashlib.sha256(wire).hexdigest() == task.payload.sha256
            on_disk = (models / "global.safetensors").read_bytes()
            sent.append((task.name, wire, on_disk))
            if (models / CHECKPOINT_FILE).exists() and task.round > 1 or task.name == "validate":
                with safe_open(str(models / CHECKPOINT_FILE), framework="numpy") as f:
                    assert not [k for k in f.keys() if k.startswith("model::")]  # no second copy of the model
                    refs = json.loads(f.metadata()[REFS_KEY])
                # the checkpoint names the global file's bytes by their hash, and that file holds them
                assert refs["model"]["sha256"] == hashlib.sha256(on_disk).hexdigest()
                assert (models / refs["model"]["file"]).read_bytes() == on_disk
                checkpoints.append((refs, on_disk))
                loaded = load_checkpoint(models)
                assert loaded is not None
                for name, arr in SerializedModel.read(models / "global.safetensors").weights().items():
                    np.testing.assert_array_equal(loaded.tensors["model"][name], arr)
                assert len(list(models.glob("checkpoint-ref.*"))) == 1  # earlier rounds' references are gone
        post(board, task)

    monkeypatch.setattr(TaskBoard, "post", watching_post)
    result = asyncio.run(simulate(_spec(3), learners(tmp_path / "sites", {"site-a": 20, "site-b": 40}), server))
    assert result.record.rounds_done == 3
    kinds = [name for name, _, _ in sent]
    assert kinds.count("train") == 3 * 2 and kinds.count("validate") == 2  # two sites each
    for name, wire, on_disk in sent:
        assert wire == on_disk, f"{name}: the bytes sent differ from the saved global model"
    assert len(checkpoints) == 2 * 2 + 2  # rounds 2, 3 and the final validation, each to two sites


def test_a_checkpoint_whose_model_file_changed_is_refused_by_name(tmp_path: Path) -> None:
    server = tmp_path / "server"
    # stopped in round 2: round 1's checkpoint refers to its global model
    asyncio.run(simulate(_spec(2), learners(tmp_path / "sites", {"site-a": 20, "site-b": 40}), server,
                         interrupt_after_results=1 + 2 + 1))
    models = server / "simulated" / "models"
    (ref,) = models.glob("checkpoint-ref.*")
    data = bytearray(ref.read_bytes())
    data[-1] ^= 1
    ref.unlink()  # a hard link: write a new file, not into the global file's bytes
    ref.write_bytes(bytes(data))
    with pytest.raises(CheckpointUnreadable, match=rf"{ref.name} does not match the SHA-256"):
        load_checkpoint(models)


def test_the_saved_models_chunks_fit_the_transports_messages() -> None:
    from runtime import model_bytes, transport

    assert model_bytes.CHUNK_BYTES == transport.CHUNK_BYTES  # not imported there, to keep grpc out of workflows
