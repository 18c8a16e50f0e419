"""What evaluate and cross_site share: score a list of models on every selected site, one validate
round per model, and keep the matrix matrix[model][site] = that site's metrics of that model. The
server holds one model in memory at a time; the matrix and the progress through the list are the
checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..tasks import TaskKind
from ..weights import Weights
from .base import RoundOutcome, RoundPlan, WorkflowContext

Matrix = dict[str, dict[str, dict[str, float]]]


class ModelScoring:
    """Validate rounds over `labels`, in order; `load(label)` gives each model when its turn comes."""

    def __init__(self, ctx: WorkflowContext, load: Callable[[str], Weights],
                 path: Callable[[str], Path | None] = lambda label: None):
        self._ctx = ctx
        self._load = load
        self._path = path  # a model with a file is sent from it, never loaded (it may be larger than memory)
        self.labels: list[str] = []
        self.matrix: Matrix = {}

    @property
    def done(self) -> bool:
        return len(self.matrix) >= len(self.labels)

    def next_plan(self, first_round: int = 1) -> RoundPlan:
        label = self.labels[len(self.matrix)]
        rnd = first_round + len(self.matrix)
        if (path := self._path(label)) is not None:
            return RoundPlan(kind=TaskKind.VALIDATE, round=rnd, model_path=path, label=label)
        return RoundPlan(kind=TaskKind.VALIDATE, round=rnd, model=self._load(label), label=label)

    def close(self, outcome: RoundOutcome) -> None:
        label = outcome.plan.label
        self.matrix[label] = {site: dict(r.validation) for site, r in sorted(outcome.results.items())}
        self._ctx.append_metrics({"type": "scored", "step": outcome.step, "model": label,
                                  "sites": self.matrix[label], "failed": outcome.failures})

    def write_report(self, kind: str) -> None:
        from ..server.cross_site_report import write_report  # matplotlib: only when a report is written

        key = self._ctx.spec.server.key_metric
        sites = sorted({s for row in self.matrix.values() for s in row})
        write_report(self._ctx.job_dir, kind, list(self.labels), sites, self.matrix, key.name, key.higher_is_better)

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels, "matrix": self.matrix}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.labels, self.matrix = list(meta["labels"]), dict(meta["matrix"])
