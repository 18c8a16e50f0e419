"""What every aggregator checks the same way: the round's lifecycle (begin, fold, close once), that an
update fits the model before any sum is touched, and that a restored state fits the model.

The workflow runs the full `weights.check_update` (names, shapes, dtypes, finite values) before `fold`;
the structural part is repeated here because a fold must leave the aggregator exactly as it was when it
raises, and it costs one dictionary walk, not a pass over the data.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, UpdateRejected
from ..weights import Weights, is_float_dtype, is_half_dtype
from .base import Update

NOTHING_FOLDED = "no usable update this round"


def is_float(arr: np.ndarray) -> bool:
    """Only float tensors are optimized (momentum, moments, control variates); integer buffers such as
    BatchNorm's num_batches_tracked just take the mean delta."""
    return is_float_dtype(arr.dtype)


def add_mean_delta(x: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
    """x + mean delta for a tensor no optimizer touches (integer buffers, robust aggregators' output):
    the delta is cast to x's dtype first (integers truncate toward zero), as `fedavg.weighted_mean` does.
    float16/bfloat16 tensors add in float64 and round once, back to their dtype."""
    if is_half_dtype(x.dtype):
        return (x.astype(np.float64) + mean_delta).astype(x.dtype)
    return x + mean_delta.astype(x.dtype, copy=False)


class RoundPhase:
    """begin_round -> fold* -> close_round, once per round. A second close_round without a new
    begin_round would apply the server step twice (momentum, Adam moments, control variates), so it is
    refused."""

    def __init__(self) -> None:
        self.model: Weights | None = None
        self.closed = False

    def begin(self, model: Weights) -> None:
        self.model = model
        self.closed = False

    def open_model(self) -> Weights:
        if self.model is None or self.closed:
            raise RuntimeError("fold or close_round outside a round (none begun, or it closed already): call "
                               "begin_round(model) first")
        return self.model

    def close(self, n_folded: int) -> None:
        """Check that the round can close; the caller marks it closed (`closed = True`) once its new
        state is committed, so a close that raises can be retried."""
        self.open_model()
        if n_folded == 0:
            raise UpdateRejected(NOTHING_FOLDED)


def check_fits(update: Update, model: Weights) -> None:
    """Refuse an update whose tensors are not the model's (name, shape, dtype), before any sum changes."""
    if not update.delta:
        raise UpdateRejected(f"site {update.site}: the update holds no tensors")
    for name, arr in update.delta.items():
        ref = model.get(name)
        if ref is None:
            raise UpdateRejected(f"site {update.site}: unknown tensor '{name}' (not in the global model)")
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise UpdateRejected(f"site {update.site}: tensor '{name}' is {arr.dtype}{list(arr.shape)}, "
                                 f"the model's is {ref.dtype}{list(ref.shape)}")


def check_weight(update: Update) -> float:
    weight = float(update.weight)
    if not math.isfinite(weight) or weight < 0:
        raise UpdateRejected(f"site {update.site}: update weight must be a finite number >= 0, got {weight}")
    return weight


def check_state_group(group: str, tensors: Weights, model: Weights, *, floats_only: bool) -> None:
    """A restored state group must name tensors of this model with its shapes: a checkpoint from another
    model must not be applied silently."""
    for name, arr in tensors.items():
        ref = model.get(name)
        if ref is None or (floats_only and not is_float(ref)):
            raise ConfigError(f"aggregator state '{group}': tensor '{name}' is not a float tensor of the job's "
                              "model; the checkpoint belongs to another model: start the job afresh")
        if arr.shape != ref.shape:
            raise ConfigError(f"aggregator state '{group}': tensor '{name}' has shape {list(arr.shape)}, the "
                              f"model's is {list(ref.shape)}; the checkpoint belongs to another model")


def take_state(state: dict[str, Weights], known: set[str]) -> dict[str, Weights]:
    """Copy a restored state, refusing groups this aggregator does not keep."""
    unknown = sorted(set(state) - known)
    if unknown:
        raise ConfigError(f"aggregator state has groups {unknown} this aggregator does not keep "
                          f"(it keeps {sorted(known) or 'none'}): the checkpoint is from another aggregator")
    return {g: {k: np.array(v, copy=True) for k, v in tensors.items()} for g, tensors in state.items()}


def copy_state(state: dict[str, Weights]) -> dict[str, Weights]:
    """state() hands out copies: the caller may write them to disk in a thread while the next round runs."""
    return {g: {k: v.copy() for k, v in tensors.items()} for g, tensors in state.items()}
