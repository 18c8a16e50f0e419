"""The chaos soak's learner: its update is a fixed function of (site, round), never of timing, so the exact
global model after any set of rounds can be computed from who answered each round (tests/soak/model.py).

The delta is integer-valued float32 in [-8, 8] and n_samples a small integer, so the server's float64
weighted sum is exact whatever order updates arrive in; the division and the float32 step are then the
same IEEE operations in the server and in the independent computation: the check is bit-exact.

A file named `crash` in the site's data root (the driver creates and removes it; the worker only reads)
makes training raise, standing in for a worker that crashes. A file named `hold` makes training wait
(bounded) until it is gone, so a site the driver is about to kill cannot answer that round first: which
sites answered a round is then the schedule's doing, not the machine's speed."""

from __future__ import annotations

import time

import numpy as np

from runtime.learner import Learner, SiteContext, TrainResult, Weights

CRASH_TRIGGER = "crash"
HOLD_TRIGGER = "hold"
HOLD_BOUND_S = 120.0


def site_index(site: str) -> int:
    """'site-7' -> 7; any other name -> a stable small number from its bytes."""
    tail = site.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else sum(site.encode()) % 97


def soak_delta(site: str, rnd: int, n_params: int) -> np.ndarray:
    s = site_index(site)
    j = np.arange(n_params, dtype=np.int64)
    return (((s * 7 + rnd * 3 + j * 5) % 17) - 8).astype(np.float32)


def soak_n_samples(site: str) -> int:
    return 10 + site_index(site)


class SoakLearner(Learner):
    def __init__(self, context: SiteContext, n_params: int = 64, train_s: float = 0.3):
        super().__init__(context)
        self.n_params = n_params
        self.train_s = train_s

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(self.n_params, dtype=np.float32)}

    def train(self, weights: Weights, round: int) -> TrainResult:
        time.sleep(self.train_s)  # the worker's own time, so faults can land mid-round; not a synchronisation
        data = self.context.data_root  # the triggers are looked at after training, so the driver has had time
        if data is not None and (data / CRASH_TRIGGER).exists():
            raise RuntimeError("soak: crash trigger present in the data root")
        deadline = time.monotonic() + HOLD_BOUND_S
        while data is not None and (data / HOLD_TRIGGER).exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the driver's hold file, bounded
        site = self.context.site
        return TrainResult(weights={"w": soak_delta(site, round, self.n_params)}, n_samples=soak_n_samples(site),
                           metrics={"round": float(round)}, is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"score": float(weights["w"].mean()), "n_samples": 1.0}
