"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning"), option II,
with the site-side update fixed so that no control variate ever leaves a site.

A site i receives the global model x and the server control variate c (sent as task extras), trains with
every local gradient corrected by c - c_i, and reports its delta_i = y_i - x and L_i, the sum over its
local steps of the learning rate it used (Update.local["lr_sum"]). It then sets

    c_i+ = c_i - c - delta_i / L_i                       (option II: c_i - c + (x - y_i) / (K * lr))

so its change dc_i = c_i+ - c_i = -c - delta_i / L_i is known to the server from delta_i and L_i alone,
even when a privacy filter changed delta_i (the site must apply its filter before it updates c_i for the
two to agree). Per round, over the sites S that were folded:

    x[t] = x[t] + server_lr * sum_i(w_i * delta_i[t]) / sum_i(w_i)      float tensors (as FedAvg does)
    x[t] = x[t] + sum_i(w_i * delta_i[t]) / sum_i(w_i)                  integer tensors (no lr, no c)
    c[t] = c[t] + (|S_t| / N) * mean_{i in S_t}(dc_i[t])
         = c[t] + (-|S_t| * c[t] - sum_{i in S_t}(delta_i[t] / L_i)) / N

where S_t are the sites that sent tensor t (a privacy filter may leave it out) and N the most sites ever
folded in one round so far (the paper's N, the number of sites, as seen by the server). This keeps
c = mean of all sites' c_i when every site starts from c_i = 0. A tensor no site sent keeps x and c.

Folding is streaming: a float64 weighted sum of delta_i and a float64 sum of delta_i / L_i, O(model).
State: c (float32, one per float tensor of the model) and N (a 0-d int64), restored on resume.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UpdateRejected
from ..tasks import LocalAlgorithm, Scaffold
from ..weights import Weights
from ._round import RoundPhase, check_fits, check_state_group, check_weight, copy_state, is_float, take_state
from .base import Update
from .config import ScaffoldConfig
from .fedavg import WeightedSum, fold, fresh_sum, server_step

CONTROL_DTYPE = np.float32


def lr_sum_of(update: Update) -> float:
    """The site's sum of local learning rates, refused unless a finite number > 0."""
    value = update.local.get("lr_sum")
    if value is None:
        raise UpdateRejected(f"site {update.site}: SCAFFOLD needs local['lr_sum'] (the sum of the local "
                             "learning rates) with the update; the site's worker did not report it")
    try:
        lr_sum = float(value)
    except (TypeError, ValueError):
        raise UpdateRejected(f"site {update.site}: local['lr_sum'] must be a number, got {type(value).__name__}")\
            from None
    if not math.isfinite(lr_sum) or lr_sum <= 0:
        raise UpdateRejected(f"site {update.site}: local['lr_sum'] must be a finite number > 0, got {lr_sum}")
    return lr_sum


class ScaffoldAggregator:
    def __init__(self, config: ScaffoldConfig):
        self.config = config
        self._round = RoundPhase()
        self._sum: WeightedSum | None = None
        self._drift: Weights = {}          # sum over the round's sites of delta_i / L_i (float64)
        self._n_sent: dict[str, int] = {}  # per float tensor: how many sites sent it this round
        self._c: Weights = {}
        self._max_sites = 0

    def begin_round(self, model: Weights) -> None:
        check_state_group("c", self._c, model, floats_only=True)
        floats = {k: v for k, v in model.items() if is_float(v)}
        self._c = {k: self._c.get(k, np.zeros(v.shape, CONTROL_DTYPE)) for k, v in floats.items()}
        self._sum = fresh_sum(self._sum, model)
        if self._drift.keys() == floats.keys() and all(self._drift[k].shape == v.shape for k, v in floats.items()):
            for arr in self._drift.values():
                arr.fill(0)
        else:
            self._drift = {k: np.zeros(v.shape, np.float64) for k, v in floats.items()}
        self._n_sent = dict.fromkeys(floats, 0)
        self._round.begin(model)

    def fold(self, update: Update) -> None:
        check_fits(update, self._round.open_model())
        weight = check_weight(update)
        inv_lr_sum = 1.0 / lr_sum_of(update)
        fold(self._sum, update.delta, weight)
        for name, d in update.delta.items():
            if name in self._drift:
                self._drift[name] += np.multiply(d, inv_lr_sum, dtype=np.float64)
                self._n_sent[name] += 1

    @property
    def n_folded(self) -> int:
        return self._sum.n_updates if self._sum is not None else 0

    def close_round(self, model: Weights) -> Weights:
        self._round.close(self.n_folded)
        n_sites = max(self._max_sites, self.n_folded)
        new_model, _ = server_step(model, self._sum, self.config.server_lr, 0.0, {})
        new_c = dict(self._c)
        for name, n_sent in self._n_sent.items():
            if n_sent:
                c = self._c[name].astype(np.float64)
                new_c[name] = (c + (-n_sent * c - self._drift[name]) / n_sites).astype(CONTROL_DTYPE)
        self._c, self._max_sites = new_c, n_sites
        self._round.closed = True
        return new_model

    def state(self) -> dict[str, Weights]:
        if not self._c:
            return {}
        return copy_state({"c": self._c, "sites": {"max_per_round": np.array(self._max_sites, np.int64)}})

    def load_state(self, state: dict[str, Weights]) -> None:
        restored = take_state(state, {"c", "sites"})
        self._c = {k: v.astype(CONTROL_DTYPE) for k, v in restored.get("c", {}).items()}
        self._max_sites = int(restored.get("sites", {}).get("max_per_round", np.array(0)))

    def task_extras(self) -> Weights:
        """The server control variate c to send with the model (zeros before the first round). Known once
        the aggregator has seen the model: call after begin_round, or after load_state on resume."""
        if not self._c and self._round.model is None:
            raise RuntimeError("ScaffoldAggregator.task_extras() before begin_round(model): c is model-shaped")
        return {k: v.copy() for k, v in self._c.items()}

    def local_algorithm(self) -> LocalAlgorithm | None:
        return Scaffold()
