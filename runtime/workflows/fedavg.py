"""FedAvg (scatter and gather), as steps: select sites, fold one result, close the round.

Each train result is a delta (trained weights minus the global weights the site received) with its
n_samples; the workflow folds it into a running weighted sum the moment it arrives and checks it
against the global model first (names, shapes, dtypes, finite values, a sane n_samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..aggregators import apply_server_step, fold, reset_sum, start_sum, weighted_mean
from ..errors import UpdateRejected
from ..job_spec import ServerJobConfig
from ..weights import Weights, check_update


@dataclass(frozen=True)
class SiteResult:
    site: str
    n_samples: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    delta: Weights | None = None


def weighted_metrics(by_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Average each metric over sites, weighted by the site's `n_samples` metric (1 when absent)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in by_site.values():
        w = float(metrics.get("n_samples", 1.0))
        for name, value in metrics.items():
            if name == "n_samples" or not isinstance(value, int | float) or not np.isfinite(value):
                continue
            totals[name] = totals.get(name, 0.0) + w * float(value)
            weights[name] = weights.get(name, 0.0) + w
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


class FedAvg:
    """Weighted FedAvg with an optional server learning rate and momentum (FedAvgM)."""

    def __init__(self, config: ServerJobConfig, model: Weights):
        self.config = config
        self.model = model
        self._velocity: Weights | None = None
        self._sum = start_sum(model)

    def select_sites(self, alive: list[str], wanted: list[str] | str) -> list[str]:
        return list(alive) if wanted == "all" else [s for s in alive if s in wanted]

    def begin_round(self) -> None:
        reset_sum(self._sum)

    def fold_result(self, result: SiteResult) -> None:
        """Check and fold one site's delta. Raises UpdateRejected; the sum is untouched then."""
        if result.delta is None:
            raise UpdateRejected("train result carries no weights")
        if result.n_samples <= 0:
            raise UpdateRejected(f"n_samples must be positive, got {result.n_samples}")
        if result.n_samples > self.config.max_n_samples:
            raise UpdateRejected(f"n_samples {result.n_samples} exceeds the job's max_n_samples "
                                 f"{self.config.max_n_samples}")
        check_update(result.delta, self.model)
        fold(self._sum, result.delta, float(result.n_samples))

    @property
    def n_folded(self) -> int:
        return self._sum.n_updates

    def close_round(self) -> Weights:
        """The new global model from everything folded this round."""
        mean = weighted_mean(self._sum, self.model)
        agg = self.config.aggregator
        self.model, self._velocity = apply_server_step(self.model, mean, agg.server_lr,
                                                       agg.server_momentum, self._velocity)
        return self.model
