"""A quantized round through the real controller, as memory sees it: each site's update decodes into a
full-precision copy of the model, so with several uploads at once the controller decodes one at a time, just
before it folds it; and the encoded global model is sent from a file, not held in memory for the round."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.job_spec import load_job_spec
from runtime.model_bytes import SerializedModel
from runtime.quantize import decode
from runtime.server import controller as controller_module
from runtime.server.taskboard import FilePayload
from runtime.simulate import simulate
from runtime.tasks import TaskKind
from runtime.weights import view_bytes
from runtime.workflows import WORKFLOWS, RoundPlan
from tests.runtime.workflows.numpy_learner import learners

SIZES = {"site-a": 30, "site-b": 60, "site-c": 90}


def test_updates_are_decoded_one_at_a_time_each_just_before_its_fold(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    live, most = [0], [0]  # decoded updates not yet folded
    decode_result, fold = controller_module._decode_result, WORKFLOWS["fedavg"].fold

    def slow_decode(*args, **kwargs):
        result = decode_result(*args, **kwargs)
        if result.kind is TaskKind.TRAIN:
            with lock:
                live[0] += 1
                most[0] = max(most[0], live[0])
            time.sleep(0.2)  # wide enough for the other sites' results to arrive meanwhile
        return result

    def counted_fold(self, result):
        try:
            return fold(self, result)
        finally:
            if result.kind is TaskKind.TRAIN:
                with lock:
                    live[0] -= 1

    monkeypatch.setattr(controller_module, "_decode_result", slow_decode)
    monkeypatch.setattr(WORKFLOWS["fedavg"], "fold", counted_fold)
    spec = load_job_spec({"meta.yml": "name: q\nmin_clients: 3", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": "rounds: 2\nwire_dtype: int8\n"
                                                   "key_metric: {name: mse, higher_is_better: false}"})
    result = asyncio.run(simulate(spec, learners(tmp_path / "sites", SIZES), tmp_path / "server"))

    assert result.global_model and live[0] == 0
    assert most[0] == 1
    # the encoded model went out from a file that is gone once the round let it go
    assert not list((tmp_path / "server").rglob("*.wire"))


def test_the_encoded_global_model_is_sent_from_a_file(tmp_path: Path) -> None:
    model = {"w": np.linspace(-1, 1, 3000, dtype=np.float32), "b": np.ones(7, np.float32)}
    saved = SerializedModel.save(model, tmp_path / "global.safetensors")
    plan = RoundPlan(kind=TaskKind.TRAIN, round=1, model=model, model_bytes=saved)

    payload, error = controller_module._payload(plan, "int8")

    assert isinstance(payload, FilePayload)
    assert not list(tmp_path.glob("*.wire"))  # unlinked at once: the open payload holds the bytes
    sent = decode(view_bytes(bytearray(payload.read_all())))
    np.testing.assert_allclose(sent["w"], model["w"], atol=error.max_abs + 1e-7)
    np.testing.assert_array_equal(sent["b"], model["b"])
    payload.close()
