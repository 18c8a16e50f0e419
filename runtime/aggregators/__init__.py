"""Aggregation math: pure functions over arrays and weights. No I/O, no logging, no globals."""

from .fedavg import WeightedSum, apply_server_step, fold, reset_sum, start_sum, weighted_mean

__all__ = ["WeightedSum", "apply_server_step", "fold", "reset_sum", "start_sum", "weighted_mean"]
