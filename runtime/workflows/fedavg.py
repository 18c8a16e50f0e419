"""FedAvg and its family (FedAvgM, FedOpt, SCAFFOLD, FedProx, median, trimmed mean): train the global
model for `rounds` rounds, then score the final model on every site.

Round r sends the global model of round r-1 to every selected site; each site first scores it on its
local validation data (so round r also tells how good model r-1 was: that picks the best model), then
trains and sends its delta with its n_samples. Each delta is checked against the global model (names,
shapes, dtypes, finite values, a sane n_samples) and folded into the job's aggregator the moment it
arrives; closing the round gives the next global model. A last `validate` round scores the final model.

What the aggregator remembers (momentum, Adam moments, SCAFFOLD's control variates) and the best score
so far are part of the checkpoint, so a server restarted mid-job resumes exactly where it was.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..aggregators import Update, build_aggregator, update_weight
from ..errors import FedkitError, UpdateRejected
from ..model_bytes import SerializedModel
from ..scalar_log import valid_count
from ..tasks import FedProx, TaskKind
from ..weights import Weights, check_update, drop_model_pages
from .base import JobResults, RoundOutcome, RoundPlan, SiteResult, WorkflowContext, weighted_metrics
from .initial_model import GLOBAL_FILE

BEST_FILE = "best.safetensors"
MODEL_GROUP = "model"
AGGREGATOR_PREFIX = "aggregator/"


class KeyMetricMissing(FedkitError):
    """No site reports the job's key metric: the job could never keep a best model."""


class NoUsableUpdate(FedkitError):
    """A training round ended without one update the server could use."""


class FedAvgWorkflow:
    name = "fedavg"

    def __init__(self, ctx: WorkflowContext):
        self._ctx = ctx
        self._cfg = ctx.spec.server
        # the global model's bytes, serialized once per round: the file, the wire and the checkpoint share them
        self._bytes: SerializedModel | None = SerializedModel.read(ctx.models_dir / GLOBAL_FILE)
        # read through a map of the file: between rounds the model costs the server no memory of its own
        self.model: Weights = self._bytes.mapped()
        custom = self._cfg.aggregator.name == "custom"
        if custom and ctx.load_aggregator is None:
            raise FedkitError("this server does not run job code: the job's custom aggregator is not allowed here")
        self._aggregator = ctx.load_aggregator(self._cfg.aggregator) if custom and ctx.load_aggregator \
            else build_aggregator(self._cfg.aggregator)
        self._round = 0                     # the last round whose model is self.model
        self._final_done = False

    # ---- the protocol ----------------------------------------------------------------------------

    def next_round(self) -> RoundPlan | None:
        if self._round < self._cfg.rounds:
            self._aggregator.begin_round(self.model)
            algorithm = self._aggregator.local_algorithm()
            if self._cfg.proximal_mu > 0:
                algorithm = FedProx(mu=self._cfg.proximal_mu)
            return RoundPlan(kind=TaskKind.TRAIN, round=self._round + 1, model=self.model,
                             extras=self._aggregator.task_extras(), algorithm=algorithm, label="global",
                             model_bytes=self._bytes)
        if not self._final_done:
            return RoundPlan(kind=TaskKind.VALIDATE, round=self._round, model=self.model, label="final global",
                             model_bytes=self._bytes)
        return None

    def fold(self, result: SiteResult) -> None:
        if result.kind is not TaskKind.TRAIN:
            return
        if result.weights is None:
            raise UpdateRejected("train result carries no weights")
        if result.n_samples <= 0:
            raise UpdateRejected(f"n_samples must be positive, got {result.n_samples}")
        if result.n_samples > self._cfg.max_n_samples:
            raise UpdateRejected(f"n_samples {result.n_samples} exceeds the job's max_n_samples "
                                 f"{self._cfg.max_n_samples}")
        check_update(result.weights, self.model)
        weighting = getattr(self._cfg.aggregator, "weighting", "n_samples")  # median, trimmed mean: none
        weight = update_weight(weighting, result.site, result.n_samples)
        self._aggregator.fold(Update(site=result.site, delta=result.weights, n_samples=result.n_samples,
                                     weight=weight, local=dict(result.local)))

    def close_round(self, outcome: RoundOutcome) -> None:
        if outcome.plan.kind is TaskKind.VALIDATE:
            self._record_validation(self._round, outcome)
            self._ctx.results.final_metrics = weighted_metrics(outcome.validations())
            self._final_done = True
            return
        rnd = outcome.plan.round
        if self._aggregator.n_folded == 0:
            raise NoUsableUpdate(f"round {rnd}: no site sent a usable update ({_reasons(outcome)})")
        self._record_validation(rnd - 1, outcome)  # before the global file is replaced
        self._replace_model(self._aggregator.close_round(self.model))
        self._round = rnd
        results = outcome.results
        self._ctx.append_metrics({
            "type": "round", "workflow": self.name, "step": outcome.step, "round": rnd, "time": time.time(),
            "sites": sorted(results), "failed": outcome.failures,
            "n_samples": {s: r.n_samples for s, r in results.items()},
            "train": {s: r.train_metrics for s, r in results.items()},
            "train_global": weighted_metrics({s: {**r.train_metrics, "n_samples": r.n_samples}
                                              for s, r in results.items()}),
            "local_validation": {s: r.local_validation for s, r in results.items() if r.local_validation},
            "privacy": outcome.privacy,
        })
        self._ctx.results.rounds_done = rnd
        self._ctx.results.sites |= set(results)
        self._ctx.audit("round_done", job_id=self._ctx.job_id, round=rnd, sites=sorted(results))

    def state(self) -> tuple[dict[str, Any], dict[str, Weights]]:
        tensors: dict[str, Any] = {MODEL_GROUP: self._bytes if self._bytes is not None else self.model}
        tensors |= {AGGREGATOR_PREFIX + group: t for group, t in self._aggregator.state().items()}
        return {"round": self._round, "final_done": self._final_done}, tensors

    def load_state(self, meta: dict[str, Any], tensors: dict[str, Weights]) -> None:
        self._round, self._final_done = int(meta["round"]), bool(meta["final_done"])
        # the global file may be a round ahead of the checkpoint (that round runs again): it becomes the
        # checkpoint's model once more, written from its arrays, and is sent from there
        self._replace_model(tensors[MODEL_GROUP])
        self._aggregator.load_state({g[len(AGGREGATOR_PREFIX):]: t for g, t in tensors.items()
                                     if g.startswith(AGGREGATOR_PREFIX)})

    def _replace_model(self, new: Weights) -> None:
        """Save `new` as the global file and read the model from that file from now on: `new`'s memory (the
        round's running sum, for FedAvg) goes back to the heap for the next round's sum, and whatever the
        close read of the old model's file leaves this process's resident memory."""
        old = self.model
        # written over the file two rounds back once nothing reads it (SerializedModel.save's keep_spare)
        self._bytes = SerializedModel.save(new, self._ctx.models_dir / GLOBAL_FILE, keep_spare=True)
        self.model = self._bytes.mapped()
        drop_model_pages(old)

    # ---- the best model --------------------------------------------------------------------------

    def _record_validation(self, model_round: int, outcome: RoundOutcome) -> None:
        """Score the model of `model_round` from what the sites reported and keep it if it is the best."""
        by_site = outcome.validations()
        if not by_site:
            return
        overall = weighted_metrics(by_site)
        key, results = self._cfg.key_metric, self._ctx.results
        _check_key_metric_reported(key.name, by_site, outcome)
        score = overall.get(key.name)
        is_best, compared_on = False, None
        if score is not None and model_round > 0:
            is_best, compared_on = _improves(by_site, score, results, key.name, key.higher_is_better)
            if is_best:
                results.best_metric, results.best_round, results.best_by_site = score, model_round, by_site
                # the global file still holds the model of `model_round` here (it is replaced after)
                _keep_as_best(self._ctx.models_dir)
        self._ctx.append_metrics({"type": "validation", "workflow": self.name, "step": outcome.step,
                                  "model_round": model_round, "sites": by_site, "global": overall,
                                  "is_best": is_best, **({"compared_on": compared_on} if compared_on else {})})


def _improves(by_site: dict[str, dict[str, float]], score: float, results: JobResults, key: str,
              higher_is_better: bool) -> tuple[bool, list[str] | None]:
    """Whether a model scored `by_site` (`score` over them all) beats the best so far, and the sites
    compared on when they are not all the sites that scored either. Scores are compared on the sites that
    scored both models with the key metric: a round a weak site failed to validate would otherwise look
    better for its absence alone (and one a strong site missed, worse). Those sites must carry more than
    half of the best's validation weight (n_samples); else the round is not judged better (one site of
    several must not pick the best, which all later rounds are then compared on). With no per-site
    figures of the best (an older checkpoint), the whole scores are compared."""
    if results.best_metric is None:
        return True, None
    best = {s: m for s, m in results.best_by_site.items() if key in m}
    new = {s: m for s, m in by_site.items() if key in m}
    if not best or set(new) == set(best):
        return _better(score, results.best_metric, higher_is_better), None
    common = sorted(set(new) & set(best))
    if 2 * _weight({s: best[s] for s in common}) <= _weight(best):
        return False, common
    new_score = weighted_metrics({s: new[s] for s in common}).get(key)
    best_score = weighted_metrics({s: best[s] for s in common}).get(key)
    if new_score is None or best_score is None:
        return False, common
    return _better(new_score, best_score, higher_is_better), common


def _better(score: float, than: float, higher_is_better: bool) -> bool:
    return score > than if higher_is_better else score < than


def _weight(by_site: dict[str, dict[str, float]]) -> float:
    """The sites' validation weight together: their n_samples (1 when absent), as weighted_metrics counts."""
    return sum(float(w) for m in by_site.values() if valid_count(w := m.get("n_samples", 1.0)))


def _check_key_metric_reported(name: str, by_site: dict[str, dict[str, float]], outcome: RoundOutcome) -> None:
    """Raise KeyMetricMissing when no site's validation names the key metric, though some site could have
    sent it (a site's `reports:` policy may withhold it; that site then only does not count): the job
    would run to its end without ever keeping a best model, and say nothing."""
    if any(name in metrics for metrics in by_site.values()):
        return
    free = [s for s in by_site if not outcome.site_reports.get(s, {}).get("key_metric_withheld")]
    if free:
        reported = sorted({k for s in free for k in by_site[s]} - {"n_samples"})
        raise KeyMetricMissing(f"key_metric '{name}' is not among the metrics the sites' validate() returns "
                               f"({', '.join(reported) or 'none'}): set key_metric in config_fed_server.yml to "
                               "one of them (`fedkit job check JOB --data DIR` checks it before a submit)")


def _keep_as_best(models: Path) -> None:
    """The global file becomes best.safetensors by a hard link, not a copy (a round that improves would
    otherwise write the model a second time): the global file is replaced by rename, and a replaced file
    is written over only while no other name links it (SerializedModel.save), so the link keeps this
    round's bytes. A copy where links are not possible."""
    tmp = models / "best.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(models / GLOBAL_FILE, tmp)
    except OSError:
        shutil.copyfile(models / GLOBAL_FILE, tmp)
    tmp.replace(models / BEST_FILE)


def _reasons(outcome: RoundOutcome) -> str:
    return "; ".join(f"{s}: {r}" for s, r in sorted(outcome.failures.items())) or "no site answered"
