"""Streaming weighted FedAvg: fold each site's delta into a running sum as it arrives, so the server
holds O(model) memory however many sites answer.

    mean_delta[t] = sum_i(n_i * delta_i[t]) / sum_i(n_i)   over the sites i that sent tensor t

Per-tensor weight totals let a site leave a tensor out (exclude-variables filter) without biasing the
others. The server step then applies the mean delta, optionally with momentum (FedAvgM):

    float tensors t that some site sent:   v[t] = momentum * v[t] + mean_delta[t]   (v = mean_delta if new)
                                           x[t] = x[t] + server_lr * v[t]           (v[t] = mean_delta[t]
                                                                                      when momentum = 0)
    integer tensors (num_batches_tracked): x[t] = x[t] + mean_delta[t]              (no lr, no momentum)
    a tensor no site sent (or only with weight 0) stays as it is, and so does its velocity.

`FedAvgAggregator` is that, as the `Aggregator` protocol; the velocity v is its state (float tensors, in
each tensor's dtype), so a job resumed after a server restart continues with the same momentum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..tasks import LocalAlgorithm
from ..weights import Weights, drop_read_pages, is_float_dtype, is_half_dtype, wide_dtype
from ._round import RoundPhase, check_fits, check_state_group, check_weight, copy_state, is_float, take_state
from .base import Update
from .config import FedAvgConfig


@dataclass
class WeightedSum:
    """Running sum of weighted deltas. Mutated in place by `fold` to stay O(model)."""

    sums: dict[str, np.ndarray]
    totals: dict[str, float] = field(default_factory=dict)
    n_updates: int = 0


def start_sum(model: Weights) -> WeightedSum:
    """An empty running sum shaped like `model` (dtypes: `_acc_dtype`)."""
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
            # one temporary the size of one tensor, never of the model; float16/bfloat16 deltas are
            # weighted in the float32 of the sum, not in their own few digits
            target += np.multiply(d, weight, dtype=target.dtype) if is_half_dtype(d.dtype) else d * weight
        drop_read_pages(d)  # folded: a spooled update's tensor leaves memory before the next is read
        acc.totals[name] += weight
    acc.n_updates += 1
    return acc


def weighted_mean(acc: WeightedSum, like: Weights) -> Weights:
    """The weighted mean delta, cast to each tensor's dtype in `like` (float16/bfloat16 tensors: kept in
    float32, so the step rounds once, to the model's dtype). A tensor no site sent (or whose total weight is
    0) gets a zero delta."""
    out: Weights = {}
    for name, ref in like.items():
        total = acc.totals.get(name, 0.0)
        dtype = _mean_dtype(ref.dtype)
        if total > 0:
            total_t = np.asarray(total, dtype=acc.sums[name].dtype)  # a float32 sum stays float32: no temporary
            out[name] = (acc.sums[name] / total_t).astype(dtype, copy=False)
        else:
            out[name] = np.zeros(ref.shape, dtype)
    return out


def apply_server_step(model: Weights, mean_delta: Weights, lr: float = 1.0,
                      momentum: float = 0.0, velocity: Weights | None = None) -> tuple[Weights, Weights | None]:
    """New global = model + lr * v, where v = momentum * velocity + mean_delta (FedAvgM; plain FedAvg
    when lr=1, momentum=0). Returns (new model, new velocity or None). float16/bfloat16 tensors step in
    float32 and keep their velocity in float32 (`wide_dtype`); the others in their own dtype."""
    new_velocity: Weights | None = None
    if momentum > 0:
        new_velocity = {}
        for name, d in mean_delta.items():
            prev = velocity.get(name) if velocity else None
            v = d if prev is None else momentum * prev + d
            new_velocity[name] = v.astype(wide_dtype(model[name].dtype), copy=False)
        step = new_velocity
    else:
        step = mean_delta
    new_model = {}
    for name, w in model.items():
        s = step[name]
        x = w.astype(np.float32) if is_half_dtype(w.dtype) else w
        new_model[name] = ((x + s) if lr == 1.0 else (x + lr * s)).astype(w.dtype, copy=False)
    return new_model, new_velocity


def _acc_dtype(arr: np.ndarray) -> np.dtype:
    """float32 sums for float32, float16 and bfloat16 tensors: a float32 sum of N deltas is off by about
    N * 6e-8 of their size, far below what a float32 (let alone a half) model can hold, and it halves the
    server's largest allocation (a 2 GB model's sum is 2 GB, not 4). float64 where precision needs it:
    float64 tensors, and integer buffers, whose counts pass float32's 2**24 exact integers."""
    if is_float_dtype(arr.dtype):
        return np.dtype(np.float64) if arr.dtype == np.float64 else np.dtype(np.float32)
    return np.dtype(np.float64) if arr.dtype.kind in "iu" else arr.dtype


def _mean_dtype(dtype: np.dtype) -> np.dtype:
    return wide_dtype(dtype)


def sent_tensors(acc: WeightedSum, model: Weights) -> list[str]:
    """The tensors some site sent this round with a weight > 0, in the model's order."""
    return [name for name in model if acc.totals.get(name, 0.0) > 0]


def server_step(model: Weights, acc: WeightedSum, lr: float, momentum: float,
                velocity: Weights, into_sum: bool = False) -> tuple[Weights, Weights]:
    """The FedAvg(M) step of the module docstring: (new model, new velocity). Tensors nobody sent are the
    same arrays as in `model`; `model` and `velocity` are not mutated.

    `into_sum`: without momentum, a tensor whose sum has the model's own dtype (float32, float64) gets its
    new values written over its sum (the same operations in the same order, so the same bits), and `acc`
    is spent: the round closes in the old model and the sum, not in those and a new model (and in the sum
    and one tensor when the old model is read from a map of its file: each tensor's pages go once stepped)."""
    sent = sent_tensors(acc, model)
    floats = [k for k in sent if is_float(model[k])]
    others = [k for k in sent if not is_float(model[k])]
    in_place = {k for k in floats if into_sum and momentum == 0 and acc.sums[k].dtype == model[k].dtype}
    new_model = dict(model)
    new_velocity = dict(velocity)
    # one tensor at a time: the mean of one tensor is a temporary, never the mean of the whole model, so
    # closing a round holds the old model, the sum and the new model (3x), not a 4th copy
    for k in floats:
        if k in in_place:
            continue
        stepped, moved = apply_server_step({k: model[k]}, weighted_mean(acc, {k: model[k]}), lr, momentum,
                                           {k: velocity[k]} if k in velocity else {})
        new_model.update(stepped)
        new_velocity.update(moved or {})
        drop_read_pages(model[k])  # a model read from its file's map: one old tensor resident at a time
    for name, d in weighted_mean(acc, {k: model[k] for k in others}).items():
        new_model[name] = (model[name] + d).astype(model[name].dtype, copy=False)
    # last, once nothing can fail for want of memory: a close that raised has left the sum untouched
    for k in (k for k in floats if k in in_place):
        new_model[k] = _step_in_place(model[k], acc.sums[k], acc.totals[k], lr)
        drop_read_pages(model[k])
    return new_model, new_velocity


def _step_in_place(x: np.ndarray, total_sum: np.ndarray, total: float, lr: float) -> np.ndarray:
    """x + lr * (total_sum / total), computed in total_sum's memory, which it returns: what
    weighted_mean then apply_server_step compute (the same roundings), without a new array."""
    np.divide(total_sum, np.asarray(total, dtype=total_sum.dtype), out=total_sum)
    if lr != 1.0:
        np.multiply(total_sum, lr, out=total_sum)
    np.add(x, total_sum, out=total_sum)
    return total_sum


class StreamingMean:
    """What FedAvg and FedOpt share: the round's updates folded, as they arrive, into one running weighted
    sum (O(model) memory; float32 for float32 and half models: `_acc_dtype`); each closes the round with its
    own server step on the mean."""

    def __init__(self) -> None:
        self._round = RoundPhase()
        self._sum: WeightedSum | None = None

    def _begin_sum(self, model: Weights) -> None:
        self._sum = fresh_sum(self._sum, model)
        self._round.begin(model)

    def fold(self, update: Update) -> None:
        check_fits(update, self._round.open_model())
        fold(self._sum, update.delta, check_weight(update))

    @property
    def n_folded(self) -> int:
        return self._sum.n_updates if self._sum is not None else 0


class FedAvgAggregator(StreamingMean):
    """Weighted FedAvg with a server learning rate and momentum (FedAvgM); O(model) memory for the round
    (a float32 running sum for a float32 model) plus the velocity when momentum > 0."""

    def __init__(self, config: FedAvgConfig):
        super().__init__()
        self.config = config
        self._velocity: Weights = {}

    def begin_round(self, model: Weights) -> None:
        check_state_group("velocity", self._velocity, model, floats_only=True)
        self._begin_sum(model)

    def close_round(self, model: Weights) -> Weights:
        self._round.close(self.n_folded)
        new_model, velocity = server_step(model, self._sum, self.config.server_lr, self.config.server_momentum,
                                          self._velocity, into_sum=True)
        self._sum = None  # its memory is the new model now; the next round sums into fresh pages
        self._velocity = velocity if self.config.server_momentum > 0 else {}
        self._round.closed = True
        return new_model

    def state(self) -> dict[str, Weights]:
        return copy_state({"velocity": self._velocity} if self._velocity else {})

    def load_state(self, state: dict[str, Weights]) -> None:
        self._velocity = take_state(state, {"velocity"}).get("velocity", {})

    def task_extras(self) -> Weights:
        return {}

    def local_algorithm(self) -> LocalAlgorithm | None:
        return None


def fresh_sum(acc: WeightedSum | None, model: Weights) -> WeightedSum:
    """Reuse last round's sum when the model has the same tensors (no fresh pages), else a new one."""
    if acc is not None and acc.sums.keys() == model.keys() and all(
            acc.sums[k].shape == v.shape and acc.sums[k].dtype == _acc_dtype(v) for k, v in model.items()):
        return reset_sum(acc)
    return start_sum(model)
