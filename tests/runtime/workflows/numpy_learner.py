"""A deterministic NumPy learner for the controller and workflow tests: linear regression by full-batch
gradient descent, so every round can be recomputed by hand in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights


def site_data(seed: int, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], dtype=np.float32) + shift).astype(np.float32)
    return x, y


def gradient(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    err = x @ w + b[0] - y
    return (2 * x.T @ err / len(y)).astype(np.float32), np.array([2 * err.mean()], dtype=np.float32)


def gd_step(model: Weights, x: np.ndarray, y: np.ndarray, lr: float) -> Weights:
    gw, gb = gradient(model["w"], model["b"], x, y)
    return {"w": (model["w"] - lr * gw).astype(np.float32), "b": (model["b"] - lr * gb).astype(np.float32)}


def mse(model: Weights, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ model["w"] + model["b"][0] - y) ** 2))


class LinearLearner(Learner):
    def __init__(self, context: SiteContext, x: np.ndarray, y: np.ndarray, lr: float = 0.1, fail: str = ""):
        super().__init__(context)
        self.x, self.y, self.lr, self.fail = x, y, lr, fail
        self.train_calls = 0

    def initial_weights(self) -> Weights:
        if self.fail == "init":
            raise NotImplementedError("this site cannot build the model")
        return {"w": np.zeros(3, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        self.train_calls += 1
        if self.fail == "nan":
            return TrainResult({"w": np.full(3, np.nan, np.float32), "b": weights["b"]}, len(self.y))
        trained = gd_step(weights, self.x, self.y, self.lr)
        return TrainResult(trained, len(self.y), {"mse": mse(weights, self.x, self.y)})

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"mse": mse(weights, self.x, self.y), "n_samples": float(len(self.y))}


def learners(tmp: Path, sizes: dict[str, int], fail: dict[str, str] | None = None) -> dict[str, LinearLearner]:
    """One learner per site, each on its own data (shifted per site: non-IID); `fail`: site -> "init" or
    "nan", a site that cannot build round 0 or one that sends NaN."""
    out = {}
    for i, (site, n) in enumerate(sizes.items()):
        x, y = site_data(i, n, shift=float(i))
        context = SiteContext(site=site, job_id="simulated", data_root=None, work_dir=tmp / site)
        context.work_dir.mkdir(parents=True, exist_ok=True)
        out[site] = LinearLearner(context, x, y, fail=(fail or {}).get(site, ""))
    return out
