"""Aggregation math: pure functions over arrays and weights, and the aggregators built on them (the
`Aggregator` protocol of base.py). No I/O, no logging, no globals."""

from .base import Aggregator, Update
from .build import build_aggregator
from .fedavg import FedAvgAggregator, WeightedSum, apply_server_step, fold, reset_sum, start_sum, weighted_mean
from .fedopt import FedOptAggregator
from .robust import MedianAggregator, TrimmedMeanAggregator
from .scaffold import ScaffoldAggregator
from .weighting import update_weight

__all__ = ["Aggregator", "FedAvgAggregator", "FedOptAggregator", "MedianAggregator", "ScaffoldAggregator",
           "TrimmedMeanAggregator", "Update", "WeightedSum", "apply_server_step", "build_aggregator", "fold",
           "reset_sum", "start_sum", "update_weight", "weighted_mean"]
