"""Runs one job: owns the round loop, the deadlines, the checkpoints and the best model.

The workflow (FedAvg) says what to fold and how to close a round; this module hands tasks to sites,
collects results as they stream in, decides when a round is over (every selected site answered, or
the rest are dead, or the deadline passed) and persists the global model after every round so a
restarted server resumes from the last completed round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audit import AuditLog
from ..errors import FedkitError, UpdateRejected
from ..job_spec import JobSpec, read_zip_member
from ..privacy_report import decode_report
from ..transport import CHUNK_BYTES
from ..weights import Weights, check_update, from_bytes, load_file, nbytes, save_file, to_bytes, view_bytes
from ..workflows import FedAvg, SiteResult, weighted_metrics
from .job_store import JobRecord, JobStore, Progress
from .metrics_check import check_metrics, check_metrics_size
from .registry import Registry
from .taskboard import NO_PAYLOAD, Payload, Task, TaskBoard

log = logging.getLogger(__name__)

TICK_S = 0.5
CROSS_SITE_FILE = "cross_site.json"  # how often a waiting round re-checks liveness and its deadline


class RoundFailed(FedkitError):
    """Too few sites answered a round within its deadline."""


class JobAborted(FedkitError):
    """An admin aborted the job."""


@dataclass
class _Round:
    """The tasks of one round in flight and what came back."""

    name: str
    round: int
    tasks: dict[str, Task]
    fold: Callable[[SiteResult], None] | None
    results: dict[str, SiteResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # per site: what its filters did
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def answered(self, site: str) -> bool:
        return site in self.results or site in self.failures


class JobController:
    def __init__(self, record: JobRecord, spec: JobSpec, store: JobStore, board: TaskBoard,
                 registry: Registry, audit: AuditLog, settings_max_update_factor: float):
        self.record = record
        self.spec = spec
        self._store = store
        self._board = board
        self._registry = registry
        self._audit = audit
        self._update_factor = settings_max_update_factor
        self._round: _Round | None = None
        self._fold_lock = asyncio.Lock()
        self._aborted = asyncio.Event()
        self._model_bytes = 0
        self._n_tensors = 0
        self._job_sha = record.job_sha256
        self._last_sites: list[str] = []
        self._tasked: set[str] = set()  # every site this run has sent a task: the ones that may fetch the job
        self._code_signature = store.code_signature(record.job_id)  # passed on to sites as submitted

    def is_selected(self, site: str) -> bool:
        """Whether `site` is one the job runs on: named by meta.sites (or any, for "all") and sent a task
        in this run. Only such a site may fetch the job's archive."""
        wanted = self.spec.meta.sites
        return site in self._tasked and (wanted == "all" or site in wanted)

    # ---- called by the federation service -------------------------------------------------------

    def max_payload_bytes(self, task: Task) -> int:
        if task.name == "submit_model":
            return int(self._model_bytes * 1.05) + 65536 + 256 * self._n_tensors
        if task.name == "init":
            return 16 << 30  # no model yet to compare against; the site that makes it is trusted this far
        if task.name == "validate":
            return 0
        return int(self._model_bytes * self._update_factor) + 65536 + 256 * self._n_tensors

    async def accept_result(self, task: Task, n_samples: int, metrics: dict[str, Any], error: str,
                            payload: bytearray | None) -> None:
        """Fold one site's result into the round it belongs to. Raises UpdateRejected."""
        rnd = self._round
        if rnd is None or task.task_id not in {t.task_id for t in rnd.tasks.values()}:
            raise UpdateRejected(f"result for task '{task.task_id[:12]}' arrived after its round closed (late)")
        site = task.site
        try:
            if error:
                rnd.failures[site] = error
                log.warning("job %s round %d: %s reports failure: %s", self.record.job_id, rnd.round, site, error)
                return
            privacy = decode_report(metrics.get("privacy"))
            result = await asyncio.to_thread(self._parse_result, site, n_samples, metrics, payload)
            if rnd.fold is not None:
                async with self._fold_lock:
                    await asyncio.to_thread(rnd.fold, result)
            # an init result is kept past this call, so copy it out of the (reused) receive buffer
            kept = {k: v.copy() for k, v in result.delta.items()} if task.name == "init" and result.delta else None
            rnd.results[site] = SiteResult(site, result.n_samples, result.train_metrics, result.validation, kept)
            if privacy is not None:
                rnd.privacy[site] = privacy
        except UpdateRejected as e:
            rnd.failures[site] = f"update rejected: {e}"
            self._audit.append("update_rejected", job_id=self.record.job_id, site=site, round=rnd.round,
                               reason=str(e))
            raise
        finally:
            self._board.complete(task)
            rnd.changed.set()

    def reject(self, task: Task, reason: str) -> None:
        """Record a result refused before it could be parsed (size, hash, stream) as the site's failure."""
        rnd = self._round
        if rnd is not None and rnd.tasks.get(task.site) is task and not rnd.answered(task.site):
            rnd.failures[task.site] = f"update rejected: {reason}"
            self._audit.append("update_rejected", job_id=self.record.job_id, site=task.site, round=rnd.round,
                               reason=reason)
            rnd.changed.set()
        self._board.complete(task)

    @staticmethod
    def _parse_result(site: str, n_samples: int, metrics: dict[str, Any], payload: bytearray | None) -> SiteResult:
        delta = view_bytes(payload) if payload else None  # views into the received buffer: no copy
        return SiteResult(site=site, n_samples=n_samples, train_metrics=_numbers(metrics.get("train")),
                          validation=_numbers(metrics.get("validation")), delta=delta)

    def abort(self) -> None:
        self._aborted.set()
        if self._round:
            self._round.changed.set()

    @property
    def current_round(self) -> int:
        return self._round.round if self._round else self.record.rounds_done

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run (or resume) the job to its end. Raises RoundFailed or JobAborted."""
        job_id, cfg = self.record.job_id, self.spec.server
        models = self._store.models_dir(job_id)
        progress = self._store.load_progress(job_id)
        # a crash may have left entries of the round in flight; that round runs again, so drop them
        done = progress.round_done if (models / "global.safetensors").exists() else 0
        self._store.keep_metrics(job_id, lambda e: e.get("round", 0) <= done if e["type"] == "round"
                                 else e.get("task") == "init" if e["type"] == "shared"
                                 else e.get("model_round", 0) < done)
        if progress.round_done > 0 and (models / "global.safetensors").exists():
            model = await asyncio.to_thread(load_file, models / "global.safetensors")
            log.info("job %s: resuming after round %d", job_id, progress.round_done)
        else:
            model = await self._initial_model()
            progress = Progress()
        self._model_bytes, self._n_tensors = nbytes(model), len(model)
        workflow = FedAvg(cfg, model)

        for rnd in range(progress.round_done + 1, cfg.rounds + 1):
            workflow.begin_round()
            done = await self._run_round("train", rnd, workflow.model, workflow.fold_result)
            if workflow.n_folded == 0:
                raise RoundFailed(f"round {rnd}: no site sent a usable update")
            await self._record_validation(rnd - 1, done, progress)
            new_model = await asyncio.to_thread(workflow.close_round)
            await asyncio.to_thread(save_file, new_model, models / "global.safetensors")
            progress.round_done = rnd
            self._store.save_progress(job_id, progress)
            self._store.append_metrics(job_id, {
                "type": "round", "round": rnd, "time": time.time(), "sites": sorted(done.results),
                "failed": done.failures,
                "n_samples": {s: r.n_samples for s, r in done.results.items()},
                "train": {s: r.train_metrics for s, r in done.results.items()},
                "train_global": weighted_metrics({s: {**r.train_metrics, "n_samples": r.n_samples}
                                                  for s, r in done.results.items()}),
                "privacy": done.privacy,
            })
            self.record.rounds_done = rnd
            self.record.sites = sorted({*self.record.sites, *done.results})  # every site that took part
            self._store.save(self.record)
            self._audit.append("round_done", job_id=job_id, round=rnd, sites=sorted(done.results))

        final = await self._run_round("validate", cfg.rounds + 1, workflow.model, None)
        await self._record_validation(cfg.rounds, final, progress)
        self.record.final_metrics = weighted_metrics({s: r.validation for s, r in final.results.items()})
        if cfg.cross_site_validation:
            await self._cross_site_validation(workflow.model, cfg.rounds + 2)

    async def _cross_site_validation(self, global_model: Weights, first_round: int) -> None:
        """Score every site's own model, and the global and best models, on every site's data.

        Site models are collected once and kept on disk, then each model is sent to all sites in turn,
        so the server never holds more than one extra model in memory. Writes cross_site.json:
        matrix[model][site] = that site's validation metrics of that model.
        """
        models_dir = self._store.models_dir(self.record.job_id)

        def keep_site_model(result: SiteResult) -> None:
            if not result.delta:
                raise UpdateRejected("submit_model result carries no weights")
            check_update(result.delta, global_model)  # a site's privacy policy may keep some tensors local
            save_file(result.delta, models_dir / f"site_{result.site}.safetensors")

        collected = await self._run_round("submit_model", first_round, None, keep_site_model)
        self._record_shared(collected)
        candidates: list[tuple[str, Path]] = [("global", models_dir / "global.safetensors")]
        if (models_dir / "best.safetensors").exists():
            candidates.append(("best", models_dir / "best.safetensors"))
        candidates += [(f"site:{site}", models_dir / f"site_{site}.safetensors") for site in sorted(collected.results)]
        matrix: dict[str, dict[str, dict[str, float]]] = {}
        for offset, (label, path) in enumerate(candidates, start=1):
            model = await asyncio.to_thread(load_file, path)
            done = await self._run_round("validate", first_round + offset, model, None)
            matrix[label] = {site: r.validation for site, r in sorted(done.results.items())}
            log.info("job %s: cross-site validation of %s on %d sites", self.record.job_id, label, len(done.results))
        result = {"models": [c[0] for c in candidates],
                  "sites": sorted({s for row in matrix.values() for s in row}), "matrix": matrix}
        path = self._store.job_dir(self.record.job_id) / CROSS_SITE_FILE
        path.with_suffix(".tmp").write_text(json.dumps(result, indent=2, sort_keys=True))
        path.with_suffix(".tmp").replace(path)
        self._audit.append("cross_site_validation_done", job_id=self.record.job_id, models=len(candidates))

    async def _initial_model(self) -> Weights:
        """Round 0: the job's own initial_model file, or else weights built by one site's learner."""
        job_id, cfg = self.record.job_id, self.spec.server
        models = self._store.models_dir(job_id)
        path = models / "initial.safetensors"
        if not path.exists() and cfg.initial_model:
            data = await asyncio.to_thread(read_zip_member, self._store.job_dir(job_id) / "job.zip",
                                           cfg.initial_model)
            initial = await asyncio.to_thread(from_bytes, data)
            await asyncio.to_thread(save_file, initial, path)
        if not path.exists():
            done = await self._init_round()
            result = next(iter(done.results.values()))
            if not result.delta:
                raise RoundFailed("round 0: the site that built the initial model sent no weights")
            await asyncio.to_thread(save_file, result.delta, path)
            self._record_shared(done)  # after the save: a resumed job never builds round 0 twice
            log.info("job %s: initial model (%d tensors) made by %s", job_id, len(result.delta), result.site)
        model = await asyncio.to_thread(load_file, path)
        for name, arr in model.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr.sum(dtype=np.float64)):
                raise RoundFailed(f"round 0: initial tensor '{name}' holds NaN or Inf")
        await asyncio.to_thread(shutil.copyfile, path, models / "global.safetensors")
        return model

    async def _init_round(self) -> _Round:
        """Round 0 on one site; if that site cannot (its policy refuses the job, its learner fails), the
        next online site tries, until every site has had its turn."""
        tried: set[str] = set()
        while True:
            try:
                return await self._run_round("init", 0, None, None, max_sites=1, exclude=tried)
            except RoundFailed as e:
                tried |= set(self._last_sites)
                wanted = self.spec.meta.sites
                others = [s for s in self._registry.alive() if s not in tried and (wanted == "all" or s in wanted)]
                if not others:
                    raise
                log.warning("job %s: %s; asking %s instead", self.record.job_id, e, others[0])

    def _record_shared(self, done: _Round) -> None:
        """A metrics entry for weights a site shared outside training (round 0, cross-site models), with
        what the site's privacy filters did to them, so show_job shows every path out of a site."""
        self._store.append_metrics(self.record.job_id, {
            "type": "shared", "task": done.name, "round": done.round, "sites": sorted(done.results),
            "failed": done.failures, "privacy": done.privacy})

    async def _record_validation(self, model_round: int, done: _Round, progress: Progress) -> None:
        """Score the model of `model_round` from what the sites reported and keep it if it is the best."""
        by_site = {s: r.validation for s, r in done.results.items() if r.validation}
        if not by_site:
            return
        overall = weighted_metrics(by_site)
        key = self.spec.server.key_metric
        score = overall.get(key.name)
        is_best = False
        if score is not None and model_round > 0:
            better = progress.best_metric is None or (
                score > progress.best_metric if key.higher_is_better else score < progress.best_metric)
            if better:
                is_best = True
                progress.best_metric, progress.best_round = score, model_round
                models = self._store.models_dir(self.record.job_id)
                # the global file still holds the model of `model_round` here (it is replaced after)
                await asyncio.to_thread(shutil.copyfile, models / "global.safetensors", models / "best.tmp")
                (models / "best.tmp").replace(models / "best.safetensors")
                self.record.best_round, self.record.best_metric = model_round, score
        self._store.append_metrics(self.record.job_id, {
            "type": "validation", "model_round": model_round, "sites": by_site, "global": overall,
            "is_best": is_best})
        self._store.save_progress(self.record.job_id, progress)

    async def _run_round(self, name: str, rnd: int, model: Weights | None,
                         fold: Callable[[SiteResult], None] | None, max_sites: int | None = None,
                         exclude: set[str] | None = None) -> _Round:
        cfg, meta = self.spec.server, self.spec.meta
        sites = await self._wait_for_sites(rnd, max_sites, exclude or set())
        self._last_sites = sites
        self._tasked.update(sites)
        payload = (await asyncio.to_thread(lambda: Payload.of(to_bytes(model), CHUNK_BYTES))
                   if model is not None else NO_PAYLOAD)
        config = {"rounds": cfg.rounds, "client": self.spec.client.model_dump(mode="json"),
                  "job_name": meta.name,
                  "submitter": {"name": self.record.submitter, "org": self.record.submitter_org,
                                "role": self.record.submitter_role},
                  "code_signature": self._code_signature}
        tasks = {site: Task(job_id=self.record.job_id, site=site, name=name, round=rnd, config=config,
                            payload=payload, timeout_s=cfg.round_timeout_s,
                            job_sha256=self._job_sha) for site in sites}
        self._round = _Round(name=name, round=rnd, tasks=tasks, fold=fold)
        for task in tasks.values():
            self._board.post(task)
        log.info("job %s: %s round %d sent to %s", self.record.job_id, name, rnd, ", ".join(sites))
        need = 1 if max_sites == 1 else meta.min_clients
        started = asyncio.get_running_loop().time()
        try:
            await self._collect(self._round, need)
        finally:
            self._board.cancel(list(tasks.values()))
            done, self._round = self._round, None
        if len(done.results) < need:
            missing = sorted(set(sites) - set(done.results))
            reasons = "; ".join(f"{s}: {done.failures.get(s, 'no answer')}" for s in missing)
            waited = asyncio.get_running_loop().time() - started
            raise RoundFailed(f"{name} round {rnd}: {len(done.results)} of min {need} sites answered "
                              f"in {waited:.0f} s (round_timeout_s {cfg.round_timeout_s:g}; {reasons})")
        return done

    async def _wait_for_sites(self, rnd: int, max_sites: int | None, exclude: set[str]) -> list[str]:
        """The sites to task this round; waits (bounded by the round timeout) until enough are alive."""
        cfg, meta = self.spec.server, self.spec.meta
        need = 1 if max_sites == 1 else meta.min_clients
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.round_timeout_s
        while True:
            self._check_aborted()
            wanted = meta.sites
            sites = [s for s in self._registry.alive() if (wanted == "all" or s in wanted) and s not in exclude]
            if len(sites) >= need:
                return sites[:max_sites] if max_sites else sites
            if loop.time() >= deadline:
                raise RoundFailed(f"round {rnd}: only {len(sites)} of min {need} sites online "
                                  f"after {cfg.round_timeout_s:g} s")
            try:
                await asyncio.wait_for(self._aborted.wait(), TICK_S)
            except TimeoutError:
                pass

    async def _collect(self, rnd: _Round, need: int) -> None:
        """Wait until every selected site answered; or until the ones still owing an answer are all dead
        and `need` answers are in; or until the round's deadline. Dead sites may come back (they register
        again and are re-sent their task) until then, so a short outage does not fail a round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.server.round_timeout_s
        while True:
            self._check_aborted()
            waiting = [s for s in rnd.tasks if not rnd.answered(s)]
            alive_waiting = [s for s in waiting if self._registry.is_alive(s)]
            if not waiting or (not alive_waiting and len(rnd.results) >= need):
                for site in waiting:
                    rnd.failures.setdefault(site, "site went silent (missed heartbeats)")
                    self._audit.append("site_timed_out", job_id=self.record.job_id, site=site, round=rnd.round)
                return
            if loop.time() >= deadline:
                for site in waiting:
                    rnd.failures.setdefault(site, "round deadline passed")
                    self._audit.append("site_timed_out", job_id=self.record.job_id, site=site, round=rnd.round)
                return
            rnd.changed.clear()
            try:
                await asyncio.wait_for(rnd.changed.wait(), TICK_S)
            except TimeoutError:
                pass

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise JobAborted(f"job {self.record.job_id} aborted")


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def decode_metrics(text: str) -> dict[str, Any]:
    """A site's metrics JSON, checked (metrics_check.py); raises UpdateRejected."""
    if not text:
        return {}
    check_metrics_size(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise UpdateRejected("metrics are not valid JSON") from None
    if not isinstance(data, dict):
        raise UpdateRejected("metrics must be a JSON object")
    check_metrics(data)
    return data
