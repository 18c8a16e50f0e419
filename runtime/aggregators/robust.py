"""Robust aggregation: the coordinate-wise median, or the trimmed mean, of the round's deltas. A few
sites with wild updates (a broken pipeline, mislabeled data, an attacker) cannot drag the model far.

    median:        x[t] = x[t] + median_i(delta_i[t])              per coordinate
    trimmed mean:  x[t] = x[t] + mean of delta_i[t] after dropping, per coordinate, the k largest and the
                   k smallest values, k = floor(trim_fraction * n_t)       (as scipy.stats.trim_mean)

over the n_t sites that sent tensor t this round (a site whose privacy filter left a tensor out is left
out of that tensor only); a tensor no site sent stays as it is. Unweighted: Update.weight is ignored.
The median is taken in the tensor's float dtype (float16/bfloat16: in float64, rounded once back to the
tensor's dtype), the trimmed mean in float64 (integer tensors: float64, cast back, truncating toward zero).

Memory cost: unlike the streaming mean, these need every update at once. Each delta is copied at fold
(the receive buffer it points into is reused), so a round holds n_sites x model bytes, plus one stacked
tensor (n_sites x the largest tensor's bytes) at a time while closing. 20 sites and a 100 MB model:
about 2 GB, plus 20 x the largest tensor. No state is kept across rounds.
"""

from __future__ import annotations

import numpy as np

from ..tasks import LocalAlgorithm
from ..weights import Weights
from ._round import RoundPhase, add_mean_delta, check_fits, take_state
from .base import Update
from .config import TrimmedMeanConfig


class _KeepAll:
    """Fold copies every delta; close stacks them tensor by tensor and applies `_statistic`."""

    def __init__(self) -> None:
        self._round = RoundPhase()
        self._kept: dict[str, list[np.ndarray]] = {}
        self._n_folded = 0

    def begin_round(self, model: Weights) -> None:
        self._kept = {}
        self._n_folded = 0
        self._round.begin(model)

    def fold(self, update: Update) -> None:
        check_fits(update, self._round.open_model())
        copies = {name: np.array(d, copy=True) for name, d in update.delta.items()}  # all or nothing
        for name, d in copies.items():
            self._kept.setdefault(name, []).append(d)
        self._n_folded += 1

    @property
    def n_folded(self) -> int:
        return self._n_folded

    def close_round(self, model: Weights) -> Weights:
        self._round.close(self._n_folded)
        new_model = dict(model)
        for name, deltas in self._kept.items():
            stacked = np.stack(deltas)
            if stacked.dtype not in (np.float32, np.float64):  # integers and half types: in float64
                stacked = stacked.astype(np.float64)
            new_model[name] = add_mean_delta(model[name], self._statistic(stacked))
            del stacked
        self._kept = {}
        self._round.closed = True
        return new_model

    def _statistic(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, Weights]:
        return {}

    def load_state(self, state: dict[str, Weights]) -> None:
        take_state(state, set())

    def task_extras(self) -> Weights:
        return {}

    def local_algorithm(self) -> LocalAlgorithm | None:
        return None


class MedianAggregator(_KeepAll):
    """Coordinate-wise median of the deltas (even n: the mean of the two middle values)."""

    def _statistic(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0, overwrite_input=True)


class TrimmedMeanAggregator(_KeepAll):
    """Coordinate-wise mean after cutting floor(trim_fraction * n) values from each end."""

    def __init__(self, config: TrimmedMeanConfig):
        super().__init__()
        self.config = config

    def _statistic(self, stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        cut = int(self.config.trim_fraction * n)  # floor, exactly as scipy.stats.trim_mean
        if cut > 0:
            stacked.partition((cut, n - cut - 1), axis=0)  # in place: the stack is ours
        return stacked[cut:n - cut].mean(axis=0, dtype=np.float64)
