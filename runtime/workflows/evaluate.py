"""External validation: score one or more given models on every selected site's data, with no training.

The commonest first medical FL study: a model trained elsewhere, scored at every hospital. The models are
safetensors files in the job folder (`evaluate_models`, else `initial_model`); the result is the
cross-site report (cross_site.json, .csv, .png) with one row per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UpdateRejected
from ..weights import Weights, from_bytes
from .base import RoundOutcome, RoundPlan, SiteResult, WorkflowContext
from .initial_model import INITIAL_FILE
from .scoring import ModelScoring

UPLOADED_LABEL = "initial_model"


class EvaluateWorkflow:
    name = "evaluate"

    def __init__(self, ctx: WorkflowContext):
        cfg = ctx.spec.server
        self._ctx = ctx
        self._scoring = ModelScoring(ctx, lambda label: from_bytes(ctx.read_job_file(label)), self._uploaded)
        self._scoring.labels = list(cfg.evaluate_models or [cfg.initial_model or UPLOADED_LABEL])

    def _uploaded(self, label: str) -> Path | None:
        """The initial model given with `submit_job --initial-model` (stored beside the job, possibly far
        larger than the archive): sent from its file, never loaded by the server."""
        path = self._ctx.models_dir / INITIAL_FILE
        if label in (UPLOADED_LABEL, self._ctx.spec.server.initial_model or UPLOADED_LABEL) and path.exists():
            return path
        return None

    def next_round(self) -> RoundPlan | None:
        return None if self._scoring.done else self._scoring.next_plan()

    def fold(self, result: SiteResult) -> None:
        if not result.validation:
            raise UpdateRejected("validate result carries no metrics")

    def close_round(self, outcome: RoundOutcome) -> None:
        self._scoring.close(outcome)
        self._ctx.results.sites |= set(outcome.results)
        if self._scoring.done:
            self._scoring.write_report(self.name)
            self._ctx.audit("evaluation_done", job_id=self._ctx.job_id, models=len(self._scoring.labels))

    def state(self) -> tuple[dict[str, Any], dict[str, Weights]]:
        return self._scoring.state(), {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Weights]) -> None:
        self._scoring.load_state(meta)
