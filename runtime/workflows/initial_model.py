"""Round 0: the model every later workflow starts from.

The job's own `initial_model` file if it ships one; otherwise one site builds it with its learner's
initial_weights(). If that site cannot (its policy refuses the job, its learner fails), the next site
tries, until every site has had its turn. The result is models/initial.safetensors and, as the first
global model, models/global.safetensors.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from ..errors import FedkitError, UpdateRejected
from ..tasks import TaskKind
from ..weights import Weights, check_file, from_bytes, is_float_dtype, save_file
from .base import RoundOutcome, RoundPlan, SiteResult, WorkflowContext

INITIAL_FILE = "initial.safetensors"
GLOBAL_FILE = "global.safetensors"


class InitialModelFailed(FedkitError):
    """No usable round-0 model: the shipped one is broken, or no site could build one."""


class InitialModel:
    name = "initial_model"

    def __init__(self, ctx: WorkflowContext):
        self._ctx = ctx
        self._tried: set[str] = set()
        self._reasons: dict[str, str] = {}
        self._done = False
        self._path = ctx.models_dir / INITIAL_FILE

    def next_round(self) -> RoundPlan | None:
        if self._done:
            return None
        if not self._path.exists() and self._ctx.spec.server.initial_model:
            initial = from_bytes(self._ctx.read_job_file(self._ctx.spec.server.initial_model))
            save_file(initial, self._path)
        if self._path.exists():
            self._finish()
            return None
        return RoundPlan(kind=TaskKind.INIT, round=0, max_sites=1, exclude=frozenset(self._tried), min_results=0,
                         label="initial model", if_no_site=self.why_no_site_left() if self._tried else "")

    def fold(self, result: SiteResult) -> None:
        if not result.weights:
            raise UpdateRejected("the site that built the initial model sent no weights")
        _check_finite(result.weights)
        save_file(result.weights, self._path)  # the receive buffer is reused: keep the model on disk now

    def close_round(self, outcome: RoundOutcome) -> None:
        if outcome.results:
            site = next(iter(outcome.results))
            self._ctx.audit("initial_model_built", job_id=self._ctx.job_id, site=site)
            self._finish()
            return
        asked = set(outcome.failures) or set(outcome.plan.exclude)
        self._tried |= asked
        self._reasons.update(outcome.failures)

    def why_no_site_left(self) -> str:
        reasons = "; ".join(f"{s}: {r}" for s, r in sorted(self._reasons.items())) or "no site answered"
        return f"round 0: no site could build the initial model ({reasons})"

    def _finish(self) -> None:
        try:  # a chunk at a time: an uploaded initial model may be larger than the server's memory allows
            check_file(self._path)
        except UpdateRejected as e:
            raise InitialModelFailed(f"round 0: initial model: {e}") from None
        # by rename, never in place: best.safetensors and checkpoint references are hard links to it
        tmp = self._ctx.models_dir / (GLOBAL_FILE + ".tmp")
        shutil.copyfile(self._path, tmp)
        tmp.replace(self._ctx.models_dir / GLOBAL_FILE)
        self._done = True

    def state(self) -> tuple[dict[str, Any], dict[str, Weights]]:
        return {"tried": sorted(self._tried)}, {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Weights]) -> None:
        self._tried = set(meta.get("tried", []))


def _check_finite(model: Weights, error: type[FedkitError] = UpdateRejected) -> None:
    for name, arr in model.items():
        if is_float_dtype(arr.dtype) and not np.isfinite(arr.sum(dtype=np.float64)):
            raise error(f"round 0: initial tensor '{name}' holds NaN or Inf")
