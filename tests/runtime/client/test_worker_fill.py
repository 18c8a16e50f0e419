"""A tensor a site's privacy policy keeps local can be missing from the global model: the worker fills it
from the learner's own weights, trains on, and never sends it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.client.worker import SiteState, handle
from runtime.learner import Learner, SiteContext, TrainResult
from runtime.weights import load_file, save_file


class Recorder(Learner):
    """Adds 1 to every tensor; remembers the names it was given."""

    def __init__(self) -> None:
        super().__init__(SiteContext(site="s", job_id="j", data_root=None, work_dir=Path(".")))
        self.seen: list[set[str]] = []

    def initial_weights(self):
        return {"w": np.zeros(3, np.float32), "secret": np.full(2, 5.0, np.float32)}

    def train(self, weights, round):
        self.seen.append(set(weights))
        return TrainResult({k: v + 1 for k, v in weights.items()}, n_samples=4)

    def validate(self, weights):
        self.seen.append(set(weights))
        return {"n_samples": 1.0}


def test_missing_tensor_is_filled_and_stays_local(tmp_path: Path) -> None:
    learner, local = Recorder(), SiteState()
    save_file({"w": np.ones(3, np.float32)}, tmp_path / "global.safetensors")  # "secret" was excluded
    handle(learner, {"op": "train", "weights": str(tmp_path / "global.safetensors"), "round": 1,
                     "out": str(tmp_path / "delta.safetensors")}, local)
    assert learner.seen == [{"w", "secret"}, {"w", "secret"}]  # validated and trained with it filled in
    delta = load_file(tmp_path / "delta.safetensors")
    assert set(delta) == {"w"}  # the server's model has no "secret": it is not sent back
    np.testing.assert_array_equal(local.weights["secret"], np.full(2, 6.0, np.float32))  # trained locally

    handle(learner, {"op": "submit_model", "out": str(tmp_path / "local.safetensors")}, local)
    assert set(load_file(tmp_path / "local.safetensors")) == {"w"}

    handle(learner, {"op": "validate", "weights": str(tmp_path / "global.safetensors")}, local)
    assert learner.seen[-1] == {"w", "secret"}  # from this site's own trained weights now


def test_complete_global_is_used_as_is(tmp_path: Path) -> None:
    learner, local = Recorder(), SiteState()
    save_file({"w": np.ones(3, np.float32), "secret": np.ones(2, np.float32)}, tmp_path / "g.safetensors")
    handle(learner, {"op": "train", "weights": str(tmp_path / "g.safetensors"), "round": 1,
                     "out": str(tmp_path / "d.safetensors")}, local)
    assert set(load_file(tmp_path / "d.safetensors")) == {"w", "secret"}
    np.testing.assert_array_equal(local.weights["secret"], np.full(2, 2.0, np.float32))
