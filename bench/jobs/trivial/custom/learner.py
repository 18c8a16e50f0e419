"""A learner whose training is trivial, so a benchmark measures fedkit's own overhead: it returns the
received weights plus a small constant, over a model of `n_params` float32 parameters."""

from __future__ import annotations

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights


class TrivialLearner(Learner):
    def __init__(self, context: SiteContext, n_params: int = 10_000_000, n_tensors: int = 10):
        super().__init__(context)
        self.sizes = [n_params // n_tensors] * n_tensors
        self.sizes[-1] += n_params - sum(self.sizes)

    def initial_weights(self) -> Weights:
        rng = np.random.default_rng(0)
        return {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(self.sizes)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        delta = {k: np.full_like(v, 0.001) for k, v in weights.items()}
        return TrainResult(weights=delta, n_samples=100, is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"score": 0.0, "n_samples": 1.0}
