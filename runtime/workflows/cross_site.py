"""Cross-site validation: every site's own model, the global and the best global model, each scored on
every site's data. The off-diagonal of the matrix is what federated learning improves.

Round 1 asks every site for its best local model (by the job's key metric, picked on the site among the
models it trained in this job); each is checked against the global model and kept on disk. Then one
validate round per model sends it to all sites, so the server never holds more than one extra model in
memory. The result is the cross-site report (cross_site.json, .csv, .png) in the job's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UpdateRejected
from ..tasks import TaskKind
from ..weights import Weights, check_update, load_file, save_file
from .base import RoundOutcome, RoundPlan, SiteResult, WorkflowContext
from .fedavg import BEST_FILE
from .initial_model import GLOBAL_FILE
from .scoring import ModelScoring

SITE_PREFIX = "site:"


class CrossSiteWorkflow:
    name = "cross_site"

    def __init__(self, ctx: WorkflowContext):
        self._ctx = ctx
        self._global = load_file(ctx.models_dir / GLOBAL_FILE)
        self._collected = False
        self._scoring = ModelScoring(ctx, lambda label: load_file(self._model_path(label)), self._model_path)

    def _model_path(self, label: str) -> Path:
        models = self._ctx.models_dir
        if label.startswith(SITE_PREFIX):
            return models / f"site_{label[len(SITE_PREFIX):]}.safetensors"
        return models / (BEST_FILE if label == "best" else GLOBAL_FILE)

    def next_round(self) -> RoundPlan | None:
        if not self._collected:
            return RoundPlan(kind=TaskKind.SUBMIT_MODEL, round=1, label="site models")
        return None if self._scoring.done else self._scoring.next_plan(first_round=2)

    def fold(self, result: SiteResult) -> None:
        if result.kind is TaskKind.SUBMIT_MODEL:
            if not result.weights:
                raise UpdateRejected("submit_model result carries no weights")
            check_update(result.weights, self._global)  # a site's privacy policy may keep some tensors local
            save_file(result.weights, self._model_path(SITE_PREFIX + result.site))

    def close_round(self, outcome: RoundOutcome) -> None:
        if outcome.plan.kind is TaskKind.SUBMIT_MODEL:
            labels = ["global"] + (["best"] if (self._ctx.models_dir / BEST_FILE).exists() else [])
            self._scoring.labels = labels + [SITE_PREFIX + s for s in sorted(outcome.results)]
            self._collected = True
            return
        self._scoring.close(outcome)
        if self._scoring.done:
            self._scoring.write_report(self.name)
            self._ctx.audit("cross_site_validation_done", job_id=self._ctx.job_id, models=len(self._scoring.labels))

    def state(self) -> tuple[dict[str, Any], dict[str, Weights]]:
        return {"collected": self._collected, **self._scoring.state()}, {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Weights]) -> None:
        self._collected = bool(meta["collected"])
        self._scoring.load_state(meta)
