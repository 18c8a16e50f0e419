"""A learner that fills the site's disk: in round 1 it writes `chunk_mb` MiB files into its scratch folder
every `pause_s` seconds, up to `limit_mb` (the test sets the site's floor well below what that reaches)."""

from __future__ import annotations

import time

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights


class DiskFiller(Learner):
    def __init__(self, context: SiteContext, chunk_mb: int = 32, pause_s: float = 0.25, limit_mb: int = 4096):
        super().__init__(context)
        self.chunk_mb, self.pause_s, self.limit_mb = chunk_mb, pause_s, limit_mb

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(4, dtype=np.float32)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        chunk = b"\0" * (self.chunk_mb << 20)
        for i in range(self.limit_mb // self.chunk_mb):
            (self.context.work_dir / f"fill-{i}.bin").write_bytes(chunk)
            time.sleep(self.pause_s)  # the worker's own pace, not a synchronisation
        return TrainResult(weights={k: np.full_like(v, 0.001) for k, v in weights.items()}, n_samples=10,
                           is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"score": 0.0, "n_samples": 1.0}
