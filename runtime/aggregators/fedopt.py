"""FedOpt: a server optimizer stepping on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2: FedAdagrad, FedAdam, FedYogi; plus server SGD with momentum).

Per round, per float tensor t that some site sent with a weight > 0 (float64 math; the new x is cast
back to the tensor's dtype, m and v are kept in the tensor's dtype, at least float32):

    D = sum_i(w_i * delta_i) / sum_i(w_i)                 the pseudo-gradient: the weighted mean delta
    sgdm:     m = beta1 * m + D                           x = x + server_lr * m            (no v)
    adagrad:  m = beta1 * m + (1 - beta1) * D             v = v + D^2
    adam:     m = beta1 * m + (1 - beta1) * D             v = beta2 * v + (1 - beta2) * D^2
    yogi:     m = beta1 * m + (1 - beta1) * D             v = v - (1 - beta2) * D^2 * sign(v - D^2)
    adagrad, adam, yogi:                                  x = x + server_lr * m / (sqrt(v) + tau)

starting from m = 0 and v = tau^2 (the paper asks v_{-1} >= tau^2), with no bias correction (as in the
paper). Integer tensors (num_batches_tracked) take the mean delta, x = x + D, with no optimizer. A tensor
no site sent this round stays as it is and its m and v do not move.

m and v are the state (`state()` -> {"m": ..., "v": ...}): two model-sized groups kept across rounds
and restored on resume, so a resumed job takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from ..tasks import LocalAlgorithm
from ..weights import Weights, drop_read_pages
from ._round import (
    add_mean_delta,
    check_state_group,
    copy_state,
    is_float,
    take_state,
)
from .config import FedOptConfig
from .fedavg import StreamingMean, sent_tensors


def _state_dtype(arr: np.ndarray) -> np.dtype:
    """float16 models keep their moments in float32: v starts at tau^2, below float16's normal range."""
    return np.result_type(arr.dtype, np.float32)


class FedOptAggregator(StreamingMean):
    def __init__(self, config: FedOptConfig):
        super().__init__()
        self.config = config
        self._m: Weights = {}
        self._v: Weights = {}

    @property
    def _adaptive(self) -> bool:
        return self.config.optimizer != "sgdm"

    def begin_round(self, model: Weights) -> None:
        check_state_group("m", self._m, model, floats_only=True)
        check_state_group("v", self._v, model, floats_only=True)
        self._begin_sum(model)

    def close_round(self, model: Weights) -> Weights:
        self._round.close(self.n_folded)
        new_model, new_m, new_v = dict(model), dict(self._m), dict(self._v)
        for name in sent_tensors(self._sum, model):
            x = model[name]
            d = self._sum.sums[name] / self._sum.totals[name]   # float64
            if not is_float(x):
                new_model[name] = add_mean_delta(x, d)
            else:
                step, new_m[name], v = self._step(name, x, d)
                if v is not None:
                    new_v[name] = v
                new_model[name] = (x.astype(np.float64) + self.config.server_lr * step).astype(x.dtype)
            drop_read_pages(x)  # a model read from its file's map: one old tensor resident at a time
        self._m, self._v = new_m, new_v
        self._round.closed = True
        return new_model

    def _step(self, name: str, x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(the step before server_lr, new m, new v or None) for one float tensor, as in the docstring."""
        cfg, dtype = self.config, _state_dtype(x)
        m = self._m[name].astype(np.float64) if name in self._m else np.zeros(x.shape, np.float64)
        if not self._adaptive:
            m = cfg.beta1 * m + d
            return m, m.astype(dtype), None
        m = cfg.beta1 * m + (1 - cfg.beta1) * d
        v = self._v[name].astype(np.float64) if name in self._v else np.full(x.shape, cfg.tau ** 2)
        d2 = d * d
        if cfg.optimizer == "adagrad":
            v = v + d2
        elif cfg.optimizer == "adam":
            v = cfg.beta2 * v + (1 - cfg.beta2) * d2
        else:  # yogi
            v = v - (1 - cfg.beta2) * d2 * np.sign(v - d2)
        # v >= 0 under every rule (yogi moves v towards D^2 by a fraction of D^2), so sqrt(v) is defined
        step = m / (np.sqrt(v) + cfg.tau)
        return step, m.astype(dtype), v.astype(dtype)

    def state(self) -> dict[str, Weights]:
        groups = {"m": self._m, "v": self._v} if self._adaptive else {"m": self._m}
        return copy_state({g: t for g, t in groups.items() if t})

    def load_state(self, state: dict[str, Weights]) -> None:
        restored = take_state(state, {"m", "v"} if self._adaptive else {"m"})
        self._m, self._v = restored.get("m", {}), restored.get("v", {})

    def task_extras(self) -> Weights:
        return {}

    def local_algorithm(self) -> LocalAlgorithm | None:
        return None
