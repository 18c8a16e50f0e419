"""Streaming weighted FedAvg: fold each site's delta into a running sum as it arrives, so the server
holds O(model) memory however many sites answer.

    mean_delta[t] = sum_i(n_i * delta_i[t]) / sum_i(n_i)   over the sites i that sent tensor t

Per-tensor weight totals let a site leave a tensor out (exclude-variables filter) without biasing the
others. The server step then applies the mean delta, optionally with momentum (FedAvgM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass
class WeightedSum:
    """Running sum of weighted deltas. Mutated in place by `fold` to stay O(model)."""

    sums: dict[str, np.ndarray]
    totals: dict[str, float] = field(default_factory=dict)
    n_updates: int = 0


def start_sum(model: Weights) -> WeightedSum:
    """An empty running sum shaped like `model` (float64 accumulators for float tensors)."""
    return WeightedSum(sums={k: np.zeros(v.shape, dtype=_acc_dtype(v)) for k, v in model.items()},
                       totals={k: 0.0 for k in model})


def reset_sum(acc: WeightedSum) -> WeightedSum:
    """Zero `acc` in place for the next round; reusing its memory avoids faulting in fresh pages."""
    for arr in acc.sums.values():
        arr.fill(0)
    acc.totals = {k: 0.0 for k in acc.totals}
    acc.n_updates = 0
    return acc


def fold(acc: WeightedSum, delta: Weights, weight: float) -> WeightedSum:
    """Add `weight * delta` into `acc` in place and return it. A weight of 0 counts the update but
    changes nothing."""
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    for name, d in delta.items():
        target = acc.sums[name]
        if weight == 1.0:
            target += d
        elif weight != 0.0:
            # one temporary the size of one tensor, never of the model
            target += d * weight
        acc.totals[name] += weight
    acc.n_updates += 1
    return acc


def weighted_mean(acc: WeightedSum, like: Weights) -> Weights:
    """The weighted mean delta, cast to each tensor's dtype in `like`. A tensor no site sent (or whose
    total weight is 0) gets a zero delta."""
    out: Weights = {}
    for name, ref in like.items():
        total = acc.totals.get(name, 0.0)
        if total > 0:
            out[name] = (acc.sums[name] / total).astype(ref.dtype, copy=False)
        else:
            out[name] = np.zeros_like(ref)
    return out


def apply_server_step(model: Weights, mean_delta: Weights, lr: float = 1.0,
                      momentum: float = 0.0, velocity: Weights | None = None) -> tuple[Weights, Weights | None]:
    """New global = model + lr * v, where v = momentum * velocity + mean_delta (FedAvgM; plain FedAvg
    when lr=1, momentum=0). Returns (new model, new velocity or None)."""
    new_velocity: Weights | None = None
    if momentum > 0:
        new_velocity = {}
        for name, d in mean_delta.items():
            prev = velocity.get(name) if velocity else None
            new_velocity[name] = d if prev is None else (momentum * prev + d).astype(d.dtype, copy=False)
        step = new_velocity
    else:
        step = mean_delta
    new_model = {}
    for name, w in model.items():
        s = step[name]
        new_model[name] = (w + s) if lr == 1.0 else (w + lr * s).astype(w.dtype, copy=False)
    return new_model, new_velocity


def _acc_dtype(arr: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if arr.dtype.kind in "fiu" else arr.dtype
