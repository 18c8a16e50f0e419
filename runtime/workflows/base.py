"""The workflow protocol: what a study does, one small class per workflow, in the spirit of Flower's
strategies. The server's controller (runtime/server/controller.py) owns the loop, and asks the current
workflow, round after round:

    plan = workflow.next_round()        what to send to which sites (None: the workflow is done)
    workflow.fold(result)               each site's result as it arrives (in a worker thread, one at a
                                        time); raise UpdateRejected to refuse it
    workflow.close_round(outcome)       the round's end: update the model, write the workflow's outputs
    workflow.state() / load_state()     everything needed to resume after a server restart, checkpointed
                                        by the controller after every round

A workflow never talks to the network, the task board or the registry, so it is tested without gRPC
(tests/runtime/workflows/). What it reads and writes on disk goes through its `WorkflowContext`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..job_spec import JobSpec
from ..model_bytes import SerializedModel
from ..scalar_log import valid_count
from ..tasks import LocalAlgorithm, TaskKind
from ..weights import Weights


@dataclass(frozen=True)
class RoundPlan:
    """One round: the same task to every site chosen for it."""

    kind: TaskKind
    round: int                                # the workflow's own round number, shown to users and sites
    model: Weights | None = None              # sent to every site (none for init and submit_model)
    extras: Weights = field(default_factory=dict)       # sent along under tasks.CONTROL_PREFIX
    algorithm: LocalAlgorithm | None = None   # the site-side algorithm (FedProx, SCAFFOLD) for train
    max_sites: int | None = None              # None: every eligible site
    exclude: frozenset[str] = frozenset()     # sites not to ask (they tried and failed already)
    min_results: int | None = None            # answers needed; None: the job's meta.min_clients
    label: str = ""                           # what the model is ("global", "site:x", a file), for logs
    if_no_site: str = ""                      # set: fail at once with this when no eligible site is online
    model_bytes: SerializedModel | None = None  # `model` already serialized (as saved): sent as is
    # a model to send as the file it is, never loaded by the server (evaluate, cross_site); `model` is None
    model_path: Path | None = None


@dataclass(frozen=True)
class SiteResult:
    """One site's answer to a task, decoded at the edge. `weights` holds what RESULT_WEIGHTS says the
    kind carries (a delta for train, a whole model for init and submit_model) and may be a view into a
    receive buffer that is reused once fold returns: copy what you keep."""

    site: str
    kind: TaskKind
    n_samples: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)        # of the model the task sent
    local: dict[str, float] = field(default_factory=dict)             # site-side algorithm figures
    local_validation: dict[str, float] = field(default_factory=dict)  # of the model the site trained
    weights: Weights | None = None
    scalars: tuple[tuple[str, int, float], ...] = ()  # what its learner logged: (name, step, value)


@dataclass
class RoundOutcome:
    plan: RoundPlan
    step: int                                 # job-wide sequence number of this round
    results: dict[str, SiteResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # per site: what its filters did
    site_reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # per site: what it kept of the job's reports
    # the checked validation scores of sites whose update was refused (NaN, shape, max_n_samples): they scored
    # the global model before training, so their scores count for that model as any other site's do
    refused_validation: dict[str, dict[str, float]] = field(default_factory=dict)

    def validations(self) -> dict[str, dict[str, float]]:
        """Every site's validation of the model this round was sent, its update kept or refused."""
        return {**{s: v for s, v in self.refused_validation.items() if v},
                **{s: r.validation for s, r in self.results.items() if r.validation}}


class Workflow(Protocol):
    name: str

    def next_round(self) -> RoundPlan | None: ...

    def fold(self, result: SiteResult) -> None: ...

    def close_round(self, outcome: RoundOutcome) -> None: ...

    def state(self) -> tuple[dict[str, Any], dict[str, Weights]]: ...

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Weights]) -> None: ...


@dataclass
class JobResults:
    """What workflows report about the job as a whole (the controller copies it into the job record)."""

    rounds_done: int = 0
    best_round: int | None = None
    best_metric: float | None = None
    # each site's validation of the best model: a later round is compared with it on the sites both have
    best_by_site: dict[str, dict[str, float]] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    sites: set[str] = field(default_factory=set)


@dataclass
class WorkflowContext:
    """A workflow's view of its job: the spec, the job's folders, and where its records go."""

    job_id: str
    spec: JobSpec
    job_dir: Path
    models_dir: Path
    append_metrics: Callable[[dict[str, Any]], None]
    audit: Callable[..., None]
    read_job_file: Callable[[str], bytes]     # a file of the submitted job folder, size-capped
    results: JobResults = field(default_factory=JobResults)
    load_aggregator: Callable[[Any], Any] | None = None  # builds a job's custom aggregator (server policy)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.job_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(path)
        return path


def weighted_metrics(by_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Average each metric over sites, weighted by the site's `n_samples` metric (1 when absent)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in by_site.values():
        w = metrics.get("n_samples", 1.0)
        if not valid_count(w):  # checked where it arrives; a weight that is no count weighs nothing here either
            continue
        w = float(w)
        for name, value in metrics.items():
            if name == "n_samples" or not isinstance(value, int | float) or not np.isfinite(value):
                continue
            totals[name] = totals.get(name, 0.0) + w * float(value)
            weights[name] = weights.get(name, 0.0) + w
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


