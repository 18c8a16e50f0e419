"""A learner for resilience tests: a model of `n_params` float32 parameters; each round it waits
`train_s` seconds (standing in for training, so a test can kill or cut a site mid-round) and returns a
constant delta of 0.001, so the global model after R rounds is exactly the initial one plus R * 0.001."""

from __future__ import annotations

import time

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights

DELTA = 0.001


class SleepyLearner(Learner):
    def __init__(self, context: SiteContext, n_params: int = 1000, n_tensors: int = 4, train_s: float = 1.0,
                 init_s: float = 0.0):
        super().__init__(context)
        time.sleep(init_s)  # a learner slow (or hung) while it is built: loading a model, a stuck mount
        self.sizes = [n_params // n_tensors] * n_tensors
        self.sizes[-1] += n_params - sum(self.sizes)
        self.train_s = train_s

    def initial_weights(self) -> Weights:
        rng = np.random.default_rng(0)
        return {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(self.sizes)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        time.sleep(self.train_s)  # the worker process's own time, not a synchronisation
        return TrainResult(weights={k: np.full_like(v, DELTA) for k, v in weights.items()}, n_samples=100,
                           metrics={"round": float(round)}, is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"score": float(np.mean([v.mean() for v in weights.values()])), "n_samples": 1.0}
