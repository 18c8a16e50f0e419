"""FedProx and SCAFFOLD through runtime.simulate: several torch sites train in one process, where the
site-side algorithms hook torch.optim process-wide (runtime/client/local_algorithms.py). Every site must
answer every round, with its algorithm applied, as separate site processes would."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.client.local_algorithms import c_i_path
from runtime.job_spec import load_job_spec
from runtime.learner import Learner, SiteContext, TrainResult, Weights
from runtime.simulate import simulate
from runtime.torch_weights import load_module_weights, module_weights

SITES = ["site-a", "site-b", "site-c"]
ROUNDS = 4


class StepsLearner(Learner):
    """Linear regression with many small SGD steps per round: every step runs torch.optim's global hooks,
    so sites training side by side overlap with another site's hook being added or removed."""

    def __init__(self, context: SiteContext, index: int, steps: int = 150):
        super().__init__(context)
        rng = np.random.default_rng(index)
        self.x = torch.from_numpy(rng.normal(size=(64, 4)).astype(np.float32))
        self.y = self.x @ torch.tensor([1.0, -1.0, 0.5, 2.0]) + float(index)
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.steps = steps

    def initial_weights(self) -> Weights:
        return {k: v.copy() for k, v in module_weights(self.model).items()}

    def _loss(self) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(self.x).squeeze(1), self.y)

    def train(self, weights: Weights, round: int) -> TrainResult:
        load_module_weights(self.model, weights)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        for _ in range(self.steps):
            optimizer.zero_grad()
            self._loss().backward()
            optimizer.step()
        return TrainResult({k: v.copy() for k, v in module_weights(self.model).items()}, len(self.y))

    def validate(self, weights: Weights) -> dict[str, float]:
        load_module_weights(self.model, weights)
        with torch.no_grad():
            return {"mse": float(self._loss()), "n_samples": float(len(self.y))}


def _run(tmp: Path, aggregator: str, mu: float = 0.0, rounds: int = ROUNDS):
    spec = load_job_spec({"meta.yml": f"name: sim\nmin_clients: {len(SITES)}",
                          "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": f"rounds: {rounds}\naggregator: {aggregator}\nproximal_mu: {mu}\n"
                                                   "key_metric: {name: mse, higher_is_better: false}"})
    learners = {}
    for i, site in enumerate(SITES):
        context = SiteContext(site=site, job_id="simulated", data_root=None, work_dir=tmp / "sites" / site)
        context.work_dir.mkdir(parents=True)
        learners[site] = StepsLearner(context, i)
    return asyncio.run(simulate(spec, learners, tmp / "server")), learners


def _every_site_every_round(result) -> None:
    rounds = [e for e in result.metrics if e["type"] == "round"]
    assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1))
    assert all(e["sites"] == SITES and not e["failed"] for e in rounds)


def test_scaffold_runs_on_every_site_of_a_simulation(tmp_path: Path) -> None:
    result, learners = _run(tmp_path, "{name: scaffold}")
    _every_site_every_round(result)
    for learner in learners.values():  # each site kept its control variate for every round
        for r in range(1, ROUNDS + 1):
            assert c_i_path(learner.context.work_dir, r).exists()


def test_fedprox_runs_on_every_site_of_a_simulation(tmp_path: Path) -> None:
    prox, _ = _run(tmp_path / "prox", "{name: fedavg}", mu=0.5)
    _every_site_every_round(prox)
    # the proximal term holds each site nearer the global model it got: round 1 moves less than FedAvg's
    prox, _ = _run(tmp_path / "prox1", "{name: fedavg}", mu=0.5, rounds=1)
    plain, _ = _run(tmp_path / "plain1", "{name: fedavg}", rounds=1)
    torch.manual_seed(0)
    start = nn.Linear(4, 1).weight.detach().numpy()
    moved = {name: float(np.linalg.norm(r.global_model["weight"] - start)) for name, r in (("prox", prox),
                                                                                            ("plain", plain))}
    assert moved["prox"] < 0.9 * moved["plain"]
