"""Aggregation math: pure functions over arrays and weights, and the aggregators built on them (the
`Aggregator` protocol of base.py). No I/O, no logging, no globals.

The names below are imported on first use (PEP 562), not with the package: importing `.config` (a job's
`aggregator:` schema, read by job_spec on every site) must not pull NumPy into an idle site daemon."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Aggregator, Update
    from .build import build_aggregator
    from .fedavg import FedAvgAggregator, WeightedSum, apply_server_step, fold, reset_sum, start_sum, weighted_mean
    from .fedopt import FedOptAggregator
    from .robust import MedianAggregator, TrimmedMeanAggregator
    from .scaffold import ScaffoldAggregator
    from .weighting import update_weight

_HOME = {"Aggregator": "base", "Update": "base", "build_aggregator": "build", "FedAvgAggregator": "fedavg",
         "WeightedSum": "fedavg", "apply_server_step": "fedavg", "fold": "fedavg", "reset_sum": "fedavg",
         "start_sum": "fedavg", "weighted_mean": "fedavg", "FedOptAggregator": "fedopt",
         "MedianAggregator": "robust", "TrimmedMeanAggregator": "robust", "ScaffoldAggregator": "scaffold",
         "update_weight": "weighting"}

__all__ = ["Aggregator", "FedAvgAggregator", "FedOptAggregator", "MedianAggregator", "ScaffoldAggregator",
           "TrimmedMeanAggregator", "Update", "WeightedSum", "apply_server_step", "build_aggregator", "fold",
           "reset_sum", "start_sum", "update_weight", "weighted_mean"]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
