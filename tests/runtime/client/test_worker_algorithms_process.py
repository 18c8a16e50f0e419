"""The real worker process, driven by the daemon's WorkerHandle (through the `off` sandbox, no gRPC): a
SCAFFOLD train reply passes the daemon's checks with its step count, the site's control variate stays in
the job's scratch folder, a learner that takes no steps fails the task with one plain line, and
submit_model answers by its task-kind name."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime.client.worker_handle import WorkerFailed
from runtime.tasks import TaskKind, with_control
from runtime.weights import load_file, save_file
from tests.runtime.client.worker_process import REPLY_TIMEOUT_S, start_worker

LEARNER = textwrap.dedent('''
    import torch
    from torch import nn
    from runtime.learner import Learner, TrainResult
    from runtime.torch_weights import load_module_weights, module_weights

    class Tiny(Learner):
        def __init__(self, context, steps=3):
            super().__init__(context)
            torch.manual_seed(0)
            self.model, self.steps = nn.Linear(3, 1), steps
            self.x, self.y = torch.randn(8, 3), torch.randn(8)

        def initial_weights(self):
            return {k: v.copy() for k, v in module_weights(self.model).items()}

        def train(self, weights, round):
            load_module_weights(self.model, weights)
            optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
            for _ in range(self.steps):
                optimizer.zero_grad()
                nn.functional.mse_loss(self.model(self.x).squeeze(1), self.y).backward()
                optimizer.step()
            return TrainResult({k: v.copy() for k, v in module_weights(self.model).items()}, n_samples=8)

        def validate(self, weights):
            load_module_weights(self.model, weights)
            with torch.no_grad():
                loss = nn.functional.mse_loss(self.model(self.x).squeeze(1), self.y).item()
            return {"loss": loss, "n_samples": 8.0}
''')


async def _run(tmp_path: Path, steps: int) -> list[dict | str]:
    """Train rounds 1 and 2 with SCAFFOLD, then submit_model; each reply, or the one line a call failed with."""
    handle, folders = await start_worker(tmp_path, "tiny", LEARNER, "tiny:Tiny", {"steps": steps})
    model = {"weight": np.zeros((1, 3), np.float32), "bias": np.zeros(1, np.float32)}
    save_file(with_control(model, {"weight": np.full((1, 3), 0.5, np.float32)}), folders.inbox / "global.safetensors")
    answers: list[dict | str] = []
    try:
        for r in (1, 2):
            try:
                answers.append(await handle.call_writing(
                    {"op": TaskKind.TRAIN.value, "weights": str(folders.inbox / "global.safetensors"), "round": r,
                     "algorithm": {"name": "scaffold"}, "key_metric": {"name": "loss", "higher_is_better": False},
                     "keep_best_local": True}, tmp_path / f"delta_{r}.safetensors", REPLY_TIMEOUT_S))
            except WorkerFailed as e:
                answers.append(str(e))
        try:
            answers.append(await handle.call_writing({"op": TaskKind.SUBMIT_MODEL.value},
                                                     tmp_path / "local.safetensors", REPLY_TIMEOUT_S))
        except WorkerFailed as e:
            answers.append(str(e))
    finally:
        await handle.stop()
        assert not handle.alive
    return answers


def test_scaffold_through_the_real_worker(tmp_path: Path) -> None:
    first, second, submitted = asyncio.run(_run(tmp_path, steps=3))
    assert isinstance(first, dict) and isinstance(second, dict) and isinstance(submitted, dict)
    assert first["local"] == {"steps": 3.0, "lr_sum": pytest.approx(0.3)}
    assert set(first["local_validation"]) == {"loss", "n_samples"}
    scratch = tmp_path / "job" / "scratch" / "scaffold"
    assert sorted(p.name for p in scratch.iterdir()) == ["c_i_round_000001.safetensors",
                                                         "c_i_round_000002.safetensors"]
    assert set(load_file(tmp_path / "delta_1.safetensors")) == {"weight", "bias"}  # no control tensors
    best = second if second["local_validation"]["loss"] < first["local_validation"]["loss"] else first
    sent = load_file(tmp_path / "local.safetensors")
    delta = load_file(tmp_path / f"delta_{1 if best is first else 2}.safetensors")
    np.testing.assert_array_equal(sent["weight"], delta["weight"])  # trained from zeros: model == delta


def test_a_learner_without_steps_fails_scaffold_in_one_plain_line(tmp_path: Path) -> None:
    first, second, submitted = asyncio.run(_run(tmp_path, steps=0))
    assert first == second == ("SCAFFOLD: the learner took no optimizer steps on torch_module()'s parameters; "
                               "train() must update them with a torch.optim optimizer for SCAFFOLD to apply")
    assert submitted == "this site has not trained in this job, so it has no local model to submit"
