"""Runs one job: the loop over its workflows and their rounds, with bounds on every wait.

For each workflow in the job's list (after round 0, the initial model, when a workflow needs one):
ask it for the next round's plan, post the task to the eligible sites, collect results as they stream in
(each is folded by the workflow the moment it arrives), decide when the round is over (every selected
site answered, or the rest are dead, or the deadline passed), let the workflow close the round, then
checkpoint. A restarted server resumes from the last checkpoint (runtime/server/checkpoint.py).

What a round does, what it sends and how results are combined is the workflow's business
(runtime/workflows/); this module knows nothing about FedAvg or cross-site validation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..audit import AuditLog
from ..errors import FedkitError, UpdateRejected
from ..job_spec import JobSpec, read_zip_member
from ..model_bytes import SerializedModel, drop_spares
from ..privacy_report import decode_report, decode_site_reports
from ..quantize import WireError, decode, encode, is_encoded
from ..task_config import TaskConfig
from ..tasks import RESULT_WEIGHTS, KeyMetricRef, TaskKind, with_control
from ..transport import CHUNK_BYTES
from ..weights import drop_model_pages, load_file, nbytes, to_bytes, view_bytes
from ..workflows import WORKFLOWS, InitialModel, JobResults, RoundOutcome, RoundPlan, SiteResult, Workflow
from ..workflows import WorkflowContext as Context
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .job_store import JobRecord, JobStore
from .metrics_check import numbers, scalars
from .registry import Registry
from .site_selection import eligible_sites
from .taskboard import NO_PAYLOAD, FilePayload, Payload, Task, TaskBoard, file_payload
from .tracker import JobTracker
from .update_spool import SpoolFiles

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often a waiting round re-checks liveness, its deadline and aborts
# A server restarted mid-job starts with no site online: its first round waits this long (or rejoin_wait_s, if
# longer) for every site of the job to reconnect, so the resumed job runs on the sites an uninterrupted run
# would have had; sites retry their connection every 10 s at most.
RESUME_WAIT_S = 60.0
INIT_PAYLOAD_LIMIT = 16 << 30  # round 0: no model yet to compare against; the site that makes it is trusted this far


class RoundFailed(FedkitError):
    """Too few sites answered a round within its deadline."""


class JobAborted(FedkitError):
    """An admin aborted the job."""


@dataclass
class _Round:
    """The tasks of one round in flight and what came back."""

    outcome: RoundOutcome
    tasks: dict[str, Task]
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    wire_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> its upload's codec error

    def answered(self, site: str) -> bool:
        return site in self.outcome.results or site in self.outcome.failures


class JobController:
    def __init__(self, record: JobRecord, spec: JobSpec, store: JobStore, board: TaskBoard,
                 registry: Registry, audit: AuditLog, settings_max_update_factor: float,
                 load_aggregator: Any = None):
        self.record = record
        self.spec = spec
        self._store = store
        self._board = board
        self._registry = registry
        self._audit = audit
        self._update_factor = settings_max_update_factor
        self._load_aggregator = load_aggregator
        self._round: _Round | None = None
        self._workflow: Workflow | None = None
        self._fold_lock = asyncio.Lock()
        self._aborted = asyncio.Event()
        self._model_bytes = 0
        self._n_tensors = 0
        self._step = 0
        self._tasked: set[str] = set()  # every site this run has sent a task: the ones that may fetch the job
        self._prepared: set[str] = set()  # the sites told to start the job's worker during round 0
        self._not_awaited: set[str] = set()  # offline sites a round's start waited for in vain (_rejoining)
        self._declined: dict[str, str] = {}  # site -> the session in which it declined the job (restarted: asked again)
        self._resume_wait_s = 0.0  # RESUME_WAIT_S from a resume until a round has started
        self._code_signature = store.code_signature(record.job_id)  # passed on to sites as submitted
        self.spool_files = SpoolFiles(store.incoming_dir)  # large updates land here, file reused (update_spool)

    def is_selected(self, site: str) -> bool:
        """Whether `site` is one the job runs on and was sent a task in this run: only such a site may
        fetch the job's archive."""
        return site in self._tasked and bool(eligible_sites(self.spec.meta, [site]))

    # ---- called by the federation service -------------------------------------------------------

    def max_payload_bytes(self, task: Task) -> int:
        """The largest result a task may send back: about one model, or one delta times the server's factor."""
        kind = TaskKind(task.name)
        slack = 65536 + 256 * self._n_tensors
        if RESULT_WEIGHTS[kind] is None:
            return 0
        if kind is TaskKind.INIT:
            return INIT_PAYLOAD_LIMIT
        if kind is TaskKind.SUBMIT_MODEL:
            return int(self._model_bytes * 1.05) + slack
        return int(self._model_bytes * self._update_factor) + slack

    async def accept_result(self, task: Task, n_samples: int, metrics: dict[str, Any], error: str,
                            payload: bytearray | None) -> None:
        """Fold one site's result into the round it belongs to. Raises UpdateRejected."""
        rnd = self._round
        if rnd is None or rnd.tasks.get(task.site) is not task:
            raise UpdateRejected(f"result for task '{task.task_id[:12]}' arrived after its round closed (late)")
        outcome, site = rnd.outcome, task.site
        try:
            if error:
                outcome.failures[site] = error
                log.warning("job %s %s: %s reports failure: %s", self.record.job_id, _what(outcome.plan), site, error)
                return
            privacy = decode_report(metrics.get("privacy"))
            kept_back = decode_site_reports(metrics.get("site_reports"))
            assert self._workflow is not None
            async with self._fold_lock:
                # decoded under the fold lock: a quantized update decodes into a full-precision copy of the
                # model, so with several uploads at once, only one such copy may exist at a time
                result = await asyncio.to_thread(_decode_result, site, TaskKind(task.name), n_samples, metrics,
                                                 payload)
                try:
                    await asyncio.to_thread(self._workflow.fold, result)
                except UpdateRejected:  # the update goes; the site's checked scores of the model it was sent stay
                    outcome.refused_validation[site] = dict(result.validation)
                    raise
                result = replace(result, weights=None)  # the receive buffer is reused; a decoded copy goes now
            if wire := _wire_error(metrics):
                rnd.wire_errors[site] = wire
            outcome.results[site] = result
            if privacy is not None:
                outcome.privacy[site] = privacy
            if kept_back is not None:
                outcome.site_reports[site] = kept_back
        except UpdateRejected as e:
            outcome.failures[site] = f"update rejected: {e}"
            await asyncio.to_thread(self._audit.append, "update_rejected", job_id=self.record.job_id, site=site,
                                    round=outcome.plan.round, reason=str(e))
            raise
        finally:
            self._board.complete(task)
            rnd.changed.set()

    async def declined(self, site: str, reason: str) -> None:
        """The site said it will run none of this job while it runs (its policy refused it, its privacy budget
        is spent, the job filled its disk): later rounds leave it out instead of tasking it every round to be
        refused again. Until it registers anew (a restart, e.g. with a changed policy): then it is asked."""
        session = self._registry.session(site)
        if session is None or self._declined.get(site) == session.session_id:
            return
        self._declined[site] = session.session_id
        log.warning("job %s: %s declines it (%s); it gets none of the job's tasks unless it restarts",
                    self.record.job_id, site, reason)
        await asyncio.to_thread(self._audit.append, "site_declined", job_id=self.record.job_id, site=site,
                                reason=reason)

    def _declines(self, site: str) -> bool:
        session = self._registry.session(site)
        return session is not None and self._declined.get(site) == session.session_id

    async def reject(self, task: Task, reason: str) -> None:
        """Record a result refused before it could be parsed (size, hash, stream) as the site's failure."""
        rnd = self._round
        if rnd is not None and rnd.tasks.get(task.site) is task and not rnd.answered(task.site):
            rnd.outcome.failures[task.site] = f"update rejected: {reason}"
            rnd.changed.set()
            self._board.complete(task)
            await asyncio.to_thread(self._audit.append, "update_rejected", job_id=self.record.job_id,
                                    site=task.site, round=rnd.outcome.plan.round, reason=reason)
            return
        self._board.complete(task)

    def abort(self) -> None:
        self._aborted.set()
        if self._round:
            self._round.changed.set()

    @property
    def current_round(self) -> int:
        return self._round.outcome.plan.round if self._round else self.record.rounds_done

    @property
    def current_plan(self) -> RoundPlan | None:
        """The round in flight (its task says which workflow step it is), None between rounds."""
        return self._round.outcome.plan if self._round else None

    def idle_site_state(self, site: str) -> str | None:
        """What a site with no task in hand is to this job, for check_status: outside the job, outside the
        round in flight (not picked for it), or done with it (the round waits for others). None while its
        task waits to be fetched, or between rounds."""
        where = f"job {self.record.job_id}"
        if not eligible_sites(self.spec.meta, [site]):
            return f"outside {where}"
        rnd = self._round
        if rnd is None:
            return None
        where = f"round {rnd.outcome.plan.round} of {where}"
        if rnd.answered(site):
            return f"done with {where}"
        return None if site in rnd.tasks else f"outside {where}"

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run (or resume) the job to its end. Raises RoundFailed, JobAborted or another FedkitError."""
        try:
            await self._run()
        finally:
            await asyncio.to_thread(self.spool_files.close)
            await asyncio.to_thread(drop_spares, self._store.models_dir(self.record.job_id))

    async def _run(self) -> None:
        job_id, names = self.record.job_id, self.spec.server.workflows
        checkpoint = await asyncio.to_thread(load_checkpoint, self._store.models_dir(job_id)) or Checkpoint()
        self._step = checkpoint.step
        # entries of a round in flight when the server stopped: that round runs again, so drop them
        self._store.keep_metrics(job_id, lambda e: e.get("step", 0) <= checkpoint.step)
        results = JobResults(**{**checkpoint.results, "sites": set(checkpoint.results.get("sites", []))})
        self._tracker = await asyncio.to_thread(JobTracker, self._store.job_dir(job_id), checkpoint.step,
                                                self.spec.server.key_metric.name)
        self._ctx = self._context(results)
        if checkpoint.step:
            log.info("job %s: resuming after step %d, in %s", job_id, checkpoint.step,
                     names[min(checkpoint.workflow_index, len(names) - 1)])
            self._resume_wait_s = RESUME_WAIT_S
        if self.spec.server.trains and checkpoint.workflow_index == 0 and not checkpoint.state:
            await self._run_workflow(InitialModel(self._ctx), 0)  # a no-op once the model is on disk
        for index in range(checkpoint.workflow_index, len(names)):
            workflow = await asyncio.to_thread(WORKFLOWS[names[index]], self._ctx)
            if index == checkpoint.workflow_index and checkpoint.state:
                workflow.load_state(checkpoint.state, checkpoint.tensors)
            await self._run_workflow(workflow, index)
            await self._checkpoint(index + 1, None)  # done: a resumed job goes on with the next one
        # curves.png is drawn when someone downloads the job (tracker.draw_curves), never on the job's path

    def _context(self, results: JobResults) -> Context:
        job_id = self.record.job_id
        archive = self._store.job_dir(job_id) / "job.zip"
        return Context(job_id=job_id, spec=self.spec, job_dir=self._store.job_dir(job_id),
                       models_dir=self._store.models_dir(job_id),
                       append_metrics=self._append_metrics,
                       audit=self._audit.append, read_job_file=lambda name: read_zip_member(archive, name),
                       results=results, load_aggregator=self._load_aggregator)

    async def _run_workflow(self, workflow: Workflow, index: int) -> None:
        """Round after round of one workflow, each closed by it and checkpointed, until it has no more."""
        self._workflow = workflow
        try:
            while (plan := await asyncio.to_thread(workflow.next_round)) is not None:
                outcome = await self._run_round(plan)
                await asyncio.to_thread(workflow.close_round, outcome)
                await asyncio.to_thread(self._tracker.round_done, outcome)
                await self._publish(outcome)
                await self._checkpoint(index, workflow)
                del plan, outcome  # they hold the model this round sent: not through the next round (memory)
        finally:
            self._workflow = None

    def _append_metrics(self, entry: dict[str, Any]) -> None:
        """A workflow's metrics entry: into metrics.jsonl, and to the job's TensorBoard files."""
        self._store.append_metrics(self.record.job_id, entry)
        self._tracker.entry(entry)

    async def _checkpoint(self, index: int, workflow: Workflow | None) -> None:
        meta, tensors = workflow.state() if workflow is not None else ({}, {})
        if isinstance(workflow, InitialModel):
            meta, tensors = {}, {}  # round 0 leaves its model on disk; the first workflow has not begun
        results = asdict(self._ctx.results)
        checkpoint = Checkpoint(workflow_index=index, step=self._step, state=meta, results=results, tensors=tensors)
        await asyncio.to_thread(save_checkpoint, self._store.models_dir(self.record.job_id), checkpoint)

    async def _publish(self, outcome: RoundOutcome) -> None:
        """Copy what the workflows know about the job into its record (on the loop, where the admin service
        reads it); write the record and metrics files in a thread."""
        results, record = self._ctx.results, self.record
        record.rounds_done, record.best_round, record.best_metric = (results.rounds_done, results.best_round,
                                                                     results.best_metric)
        record.final_metrics = dict(results.final_metrics)
        record.sites = sorted({*record.sites, *results.sites, *outcome.results})  # every site that took part
        await asyncio.to_thread(self._store.save, replace(record, sites=list(record.sites),
                                                          final_metrics=dict(record.final_metrics)))
        if outcome.site_reports:  # what sites kept of the job's own reports, for show_job
            await asyncio.to_thread(self._store.append_metrics, record.job_id, {
                "type": "site_reports", "task": outcome.plan.kind.value, "step": outcome.step,
                "round": outcome.plan.round, "sites": outcome.site_reports})
        if RESULT_WEIGHTS[outcome.plan.kind] == "whole_model":
            # round 0 and cross-site models: show_job shows every path out of a site, with its filters
            await asyncio.to_thread(self._store.append_metrics, record.job_id, {
                "type": "shared", "task": outcome.plan.kind.value, "step": outcome.step, "round": outcome.plan.round,
                "sites": sorted(outcome.results), "failed": outcome.failures, "privacy": outcome.privacy})

    # ---- one round ------------------------------------------------------------------------------

    async def _run_round(self, plan: RoundPlan) -> RoundOutcome:
        """Post the plan's task to the eligible sites and collect what comes back, within the deadline."""
        cfg, meta = self.spec.server, self.spec.meta
        sites = await self._wait_for_sites(plan)
        self._tasked.update(sites)
        self._step += 1
        if plan.model is not None:
            self._model_bytes, self._n_tensors = nbytes(plan.model), len(plan.model)
        payload, wire_error = await asyncio.to_thread(_payload, plan, cfg.wire_dtype)
        config = TaskConfig(
            job_name=meta.name, workflow=self._workflow.name if self._workflow else "", rounds=cfg.rounds,
            step=self._step, client=self.spec.client.model_dump(mode="json"),
            submitter={"name": self.record.submitter, "org": self.record.submitter_org,
                       "role": self.record.submitter_role},
            code_signature=self._code_signature, algorithm=plan.algorithm,
            key_metric=KeyMetricRef(**cfg.key_metric.model_dump()),
            keep_best_local="cross_site" in cfg.workflows, wire_dtype=cfg.wire_dtype).model_dump(mode="json")
        tasks = {site: Task(job_id=self.record.job_id, site=site, name=plan.kind.value, round=plan.round,
                            config=config, payload=payload, timeout_s=cfg.round_timeout_s,
                            job_sha256=self.record.job_sha256) for site in sites}
        self._round = _Round(outcome=RoundOutcome(plan=plan, step=self._step), tasks=tasks)
        for task in tasks.values():
            self._board.post(task)
        log.info("job %s: %s sent to %s", self.record.job_id, _what(plan), ", ".join(sites))
        preparing = self._prepare_others(plan, sites, config) if plan.kind is TaskKind.INIT else []
        need = self._needed(plan)
        started = asyncio.get_running_loop().time()
        try:
            await self._collect(self._round, need)
        finally:
            self._board.cancel([*tasks.values(), *preparing])
            done, self._round = self._round, None
        outcome = done.outcome
        if cfg.wire_dtype != "float32":
            await asyncio.to_thread(self._store.append_metrics, self.record.job_id, {
                "type": "wire", "wire_dtype": cfg.wire_dtype, "task": plan.kind.value, "step": outcome.step,
                "round": plan.round, "bytes_sent": payload.nbytes,
                "sent": wire_error.as_metrics() if wire_error else None, "received": done.wire_errors})
        if len(outcome.results) < need:
            missing = sorted(set(sites) - set(outcome.results))
            reasons = "; ".join(f"{s}: {outcome.failures.get(s, 'no answer')}" for s in missing)
            waited = asyncio.get_running_loop().time() - started
            # what each site did in the round that ended the job, for show_job (a closed round has its own entry)
            await asyncio.to_thread(self._store.append_metrics, self.record.job_id, {
                "type": "round_failed", "task": plan.kind.value, "step": outcome.step, "round": plan.round,
                "time": time.time(), "sites": sorted(outcome.results),
                "n_samples": {s: r.n_samples for s, r in outcome.results.items()},
                "train": {s: r.train_metrics for s, r in outcome.results.items()},
                "failed": {s: outcome.failures.get(s, "no answer") for s in missing}})
            raise RoundFailed(f"{_what(plan)}: {len(outcome.results)} of min {need} sites answered "
                              f"in {waited:.0f} s (round_timeout_s {cfg.round_timeout_s:g}; {reasons})")
        return outcome

    def _prepare_others(self, plan: RoundPlan, init_sites: list[str], config: dict[str, Any]) -> list[Task]:
        """While one site builds the round-0 model, tell every other eligible site online to fetch and
        check the job and start its worker (a `prepare` task, never answered), once per job: round 1 then
        finds their workers running instead of waiting for each to start after round 0. A site that
        cannot run the job says so in round 1, where its refusal counts."""
        sites = [s for s in eligible_sites(self.spec.meta, self._registry.alive(), plan.exclude)
                 if s not in init_sites and s not in self._prepared]
        self._prepared.update(sites)
        self._tasked.update(sites)
        tasks = [Task(job_id=self.record.job_id, site=site, name=TaskKind.PREPARE.value, round=plan.round,
                      config=config, timeout_s=self.spec.server.round_timeout_s, job_sha256=self.record.job_sha256)
                 for site in sites]
        for task in tasks:
            self._board.post(task)
        return tasks

    def _needed(self, plan: RoundPlan) -> int:
        if plan.min_results is not None:
            return plan.min_results
        return min(self.spec.meta.min_clients, plan.max_sites or self.spec.meta.min_clients)

    async def _wait_for_sites(self, plan: RoundPlan) -> list[str]:
        """The sites to task this round; waits (bounded by the round timeout) until enough are alive, then
        up to `rejoin_wait_s` more for sites that took part in the job before and are offline now."""
        need = max(1, self._needed(plan))
        loop = asyncio.get_running_loop()
        timeout_s = self.spec.server.round_timeout_s
        started = loop.time()
        deadline = started + timeout_s
        rejoin_wait_s = max(self.spec.server.rejoin_wait_s, self._resume_wait_s)
        rejoin_until = started + min(rejoin_wait_s, timeout_s)
        while True:
            self._check_aborted()
            online = self._registry.alive()
            sites = eligible_sites(self.spec.meta, [s for s in online if not self._declines(s)], plan.exclude)
            away = eligible_sites(self.spec.meta, self._rejoining(online), plan.exclude)  # a decliner is not away
            if len(sites) >= need and (not away or loop.time() >= rejoin_until):
                self._not_awaited.update(away)
                self._resume_wait_s = 0.0
                if away:
                    log.info("job %s: %s goes on without %s (offline for %g s%s)", self.record.job_id, _what(plan),
                             ", ".join(sorted(away)), rejoin_wait_s,
                             " since the server's restart" if rejoin_wait_s > self.spec.server.rejoin_wait_s
                             else ", rejoin_wait_s")
                return sites[:plan.max_sites] if plan.max_sites else sites
            if plan.if_no_site and not sites:
                raise RoundFailed(plan.if_no_site)
            if loop.time() >= deadline:
                declining = sorted(s for s in self._declined if self._declines(s))
                raise RoundFailed(f"{_what(plan)}: only {len(sites)} of min {need} sites online after {timeout_s:g} s"
                                  + (f" ({', '.join(declining)} declined the job)" if declining else ""))
            try:
                await asyncio.wait_for(self._aborted.wait(), TICK_S)
            except TimeoutError:
                pass

    def _rejoining(self, alive: list[str]) -> list[str]:
        """Sites that took part in the job before and are offline now: the ones a round's start waits for
        (rejoin_wait_s). Not a revoked site, nor one a round's start already waited for in vain and that
        has not been back since: a site gone for good costs the wait once, not every round."""
        self._not_awaited.intersection_update(set(self.record.sites) - set(alive))
        offline = set(self.record.sites) - set(alive) - self._not_awaited
        return sorted(s for s in offline if not ((session := self._registry.session(s)) and session.is_revoked))

    async def _collect(self, rnd: _Round, need: int) -> None:
        """Wait until every selected site answered; or until the ones still owing an answer are all dead
        (for `rejoin_wait_s` at least) and `need` answers are in; or until the round's deadline. Dead sites
        may come back (they register again and are re-sent their task) until then, so a short outage does
        not fail a round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.server.round_timeout_s
        rejoin_wait_s = self.spec.server.rejoin_wait_s
        outcome = rnd.outcome
        silent_since: dict[str, float] = {}  # site owing an answer -> when it was first seen dead
        while True:
            self._check_aborted()
            now = loop.time()
            waiting = [s for s in rnd.tasks if not rnd.answered(s)]
            alive_waiting = [s for s in waiting if self._registry.is_alive(s)]
            for site in waiting:
                if site in alive_waiting:
                    silent_since.pop(site, None)
                elif site not in silent_since:
                    silent_since[site] = now
                    log.warning("job %s %s: %s is gone (%s); it has %g s to come back", self.record.job_id,
                                _what(outcome.plan), site, self._registry.why_gone(site), rejoin_wait_s)
            # a silent site is still waited for until rejoin_wait_s passed since it went silent
            owed = [s for s in waiting if s in alive_waiting or now - silent_since[s] < rejoin_wait_s]
            timed_out = now >= deadline
            if not waiting or (not owed and len(outcome.results) >= need) or timed_out:
                for site in waiting:
                    outcome.failures.setdefault(site, "round deadline passed" if site in alive_waiting
                                                else f"site gone: {self._registry.why_gone(site)}")
                    await asyncio.to_thread(self._audit.append, "site_timed_out", job_id=self.record.job_id,
                                            site=site, round=outcome.plan.round)
                return
            rnd.changed.clear()
            try:
                await asyncio.wait_for(rnd.changed.wait(), TICK_S)
            except TimeoutError:
                pass

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise JobAborted("stopped by abort_job while it ran")  # the record says "aborted" and the job id


def _payload(plan: RoundPlan, wire_dtype: str) -> tuple[Payload | FilePayload, WireError | None]:
    """What the round sends: the model's file as the workflow saved it when it has one (serialized once
    per round, sent a chunk at a time from disk), else the model (and its extras) serialized here; encoded
    for the wire when the job says so (with the error that costs)."""
    if plan.model is None and plan.model_path is not None:
        plan = replace(plan, model=load_file(plan.model_path)) if wire_dtype != "float32" else plan
        if plan.model is None:
            return file_payload(plan.model_path), None
    if plan.model is None:
        return NO_PAYLOAD, None
    if wire_dtype != "float32":
        encoded, error = encode(with_control(plan.model, plan.extras), wire_dtype)
        drop_model_pages(plan.model)  # read from its file's map: encoded, it need not stay resident
        saved = plan.model_path or (plan.model_bytes.path if plan.model_bytes is not None else None)
        if saved is None:
            return Payload.of(to_bytes(encoded), CHUNK_BYTES), error
        # written beside the model and sent from disk, like a float32 round: held in memory, the encoded
        # bytes and their chunks cost the server two more copies of the encoded model for the whole round
        wire_file = saved.with_name(f"{saved.stem}.{wire_dtype}.wire")
        payload = FilePayload.of_model(SerializedModel.save(encoded, wire_file))
        wire_file.unlink()  # the payload's open descriptor keeps the bytes until the round lets them go
        return payload, error
    if plan.model_bytes is not None and not plan.extras:
        if plan.model_bytes.path is not None and not plan.model_bytes.chunks:
            return FilePayload.of_model(plan.model_bytes), None
        return Payload.of_model(plan.model_bytes), None
    payload = Payload.of(to_bytes(with_control(plan.model, plan.extras)), CHUNK_BYTES)
    drop_model_pages(plan.model)
    return payload, None


def _wire_error(metrics: dict[str, Any]) -> dict[str, float]:
    """The codec error a site reports for its upload: only the two known numbers, finite (it is the
    site's word: shown, never acted on)."""
    reported = numbers(metrics.get("wire"))
    return {k: v for k in WireError().as_metrics() if math.isfinite(v := reported.get(k, math.nan))}


def _what(plan: RoundPlan) -> str:
    return f"{plan.kind.value} round {plan.round}" + (f" ({plan.label})" if plan.label else "")


def _decode_result(site: str, kind: TaskKind, n_samples: int, metrics: dict[str, Any],
                   payload: bytearray | None) -> SiteResult:
    """A site's result as the workflow sees it: checked numbers, and weights as views into the received
    buffer (no copy), or decoded from the wire codec the site used."""
    weights = view_bytes(payload) if payload else None
    if weights is not None and is_encoded(weights):
        weights = decode(weights)
    return SiteResult(site=site, kind=kind, n_samples=n_samples, train_metrics=numbers(metrics.get("train")),
                      validation=numbers(metrics.get("validation")), local=numbers(metrics.get("local")),
                      local_validation=numbers(metrics.get("local_validation")),
                      weights=weights, scalars=scalars(metrics.get("scalars")))
