"""A learner that tries to carry the site's data out beside its weights: it reads the second line of
train.csv (the first patient) and puts it in a metric name, a metric value, a logged scalar and, in
round 2, an exception's message. Its weights are a constant delta, so the privacy chain is not the point."""

from __future__ import annotations

import re

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights


class LeakyLearner(Learner):
    def __init__(self, context: SiteContext):
        super().__init__(context)
        assert context.data_root is not None
        row = (context.data_root / "train.csv").read_text().splitlines()[1]
        self.name = "row_" + re.sub(r"[^A-Za-z0-9]", "_", row)[:60]  # a valid metric name carrying the row
        self.value = float(row.split(",")[0])  # the first feature, exactly

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(4, dtype=np.float32)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        if round == 2:
            raise ValueError(f"cannot train on {self.name}")
        self.context.log_scalar(self.name, self.value, round)
        self.context.log_scalar("loss", 0.5, round)
        return TrainResult(weights={k: np.full_like(v, 0.001) for k, v in weights.items()}, n_samples=10,
                           metrics={self.name: 1.0, "feature": self.value, "loss": 0.5}, is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"score": 0.123456789, self.name: 1.0, "n_samples": 10.0}
