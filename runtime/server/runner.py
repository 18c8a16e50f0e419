"""The job queue and scheduler: jobs run one at a time, in submission order, each once the sites it
needs are online. A job that was running when the server stopped is resumed first on restart.

A queued job whose sites are offline does not hold up the jobs behind it: the first queued job whose
sites are ready runs. The queue itself is the job store on disk, so it survives a restart or a crash.
The scheduler loop never dies of one bad job: an internal error fails that job and the loop goes on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..aggregators.custom import load_job_aggregator
from ..audit import AuditLog
from ..errors import FedkitError, JobRejected
from ..identity import Identity
from ..job_spec import (
    CUSTOM_DIR,
    JobMeta,
    JobSpec,
    check_archive,
    load_job_spec,
    read_zip_configs,
    safe_extract,
    sha256_hex,
    spec_to_json,
)
from .code_intake import signed_code
from .controller import JobAborted, JobController
from .job_quota import JobQuota
from .job_store import FINAL_STATES, JobRecord, JobState, JobStore
from .registry import Registry
from .site_selection import enough_sites, unknown_sites, waiting_for
from .taskboard import TaskBoard

log = logging.getLogger(__name__)

SCHEDULER_TICK_S = 0.5


class JobRunner:
    def __init__(self, store: JobStore, board: TaskBoard, registry: Registry, audit: AuditLog,
                 max_update_factor: float, quota: JobQuota | None = None, allow_job_aggregators: bool = False,
                 roster: Iterable[str] = ()):
        self.store = store
        self._roster = frozenset(roster)  # the sites provisioned with this server's kit (add-site ones join later)
        self._allow_job_aggregators = allow_job_aggregators
        self._quota = quota or JobQuota()
        # parsed specs by job id: spec.json never changes once written, and the scheduler asks every tick
        self._specs: dict[str, JobSpec] = {}
        self._board = board
        self._registry = registry
        self._audit = audit
        self._max_update_factor = max_update_factor
        self._wakeup = asyncio.Event()
        self._submit_lock = asyncio.Lock()  # submission numbers are handed out one at a time
        self._current: JobController | None = None
        self._aborted_ids: set[str] = set()
        self._deleted_ids: set[str] = set()

    # ---- admin-facing ----------------------------------------------------------------------------

    async def submit(self, submitter: Identity, archive: Path, overrides: list[str], sha256: str = "",
                     code_signature: Any = None, initial_model: Path | None = None) -> JobRecord:
        """Validate and queue a job archive: a file in store.incoming_dir, moved into the job's folder when
        accepted (`sha256`: its hash, when the upload computed it already), with the admin's signature over
        its code if one came, and a checked initial model file (in incoming_dir too) to move to the job's
        models/initial.safetensors. Raises JobRejected with the file and field at fault, or the quota and how to
        free it."""
        async with self._submit_lock:
            record = await asyncio.to_thread(self._store_new_job, submitter, archive, overrides, sha256,
                                             code_signature, initial_model)
        self._wakeup.set()  # here, on the loop: an asyncio.Event must not be set from a worker thread
        return record

    def check_quota(self, submitter: Identity, new_bytes: int = 0) -> None:
        """JobRejected if `submitter` may not store another job (of `new_bytes`; 0: count only)."""
        self._quota.check(self.store, submitter.name, new_bytes)

    def _store_new_job(self, submitter: Identity, archive: Path, overrides: list[str], sha256: str,
                       code_signature: Any = None, initial_model: Path | None = None) -> JobRecord:
        check_archive(archive)
        spec = load_job_spec(read_zip_configs(archive), overrides)
        if spec.server.aggregator.name == "custom" and not self._allow_job_aggregators:
            raise JobRejected("config_fed_server.yml: field 'aggregator': this server runs no job code, so a "
                              "custom aggregator is refused (server IT may allow it: allow_job_aggregators "
                              "in local/server.yml); use a built-in one")
        size = archive.stat().st_size + (initial_model.stat().st_size if initial_model else 0)
        self.check_quota(submitter, size)
        spec_json = spec_to_json(spec)
        code = signed_code(archive, code_signature)
        record = JobRecord(
            job_id=self.store.new_id(), name=spec.meta.name, state=JobState.QUEUED,
            submitter=submitter.name, submitter_org=submitter.org,
            submitter_role=submitter.role.value if submitter.role else "",
            submitted_at=time.time(), job_sha256=sha256 or _file_sha256(archive),
            config_hash=sha256_hex(spec_json.encode())[:16], overrides=list(overrides),
            rounds_total=spec.server.rounds if spec.server.trains else 0, seq=self.store.next_seq(),
            code_sha256=code.code_sha256, code_signed_by=code.signed_by,
        )
        return self.store.create_from_file(archive, spec_json, record, code.signature, initial_model)

    def spec(self, job_id: str) -> JobSpec:
        """The job's validated spec, read from disk once and then kept (until the job is deleted)."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = JobSpec.model_validate(json.loads((self.store.job_dir(job_id) / "spec.json").read_text()))
            self._specs[job_id] = spec
        return spec

    def abort(self, job_id: str) -> JobRecord:
        """Abort a queued or running job. The id is noted before anything else, so a scheduler that has
        just picked the job (in its thread) sees the abort before it starts it."""
        record = self.store.load(job_id)
        if record.state in FINAL_STATES:
            raise JobRejected(f"job {job_id} already {record.state.value}")
        self._aborted_ids.add(job_id)
        if self._current and self._current.record.job_id == job_id:
            self._current.abort()
            return record  # the run loop records the end, once the controller has stopped
        record.state, record.finished_at = JobState.ABORTED, time.time()
        record.error = "stopped by abort_job before it started"
        self.store.save(record)
        return record

    async def delete(self, job_id: str) -> None:
        """Delete a job that is not running; raises JobRejected for a running one."""
        record = self.store.load(job_id)
        if record.state is JobState.RUNNING or (self._current and self._current.record.job_id == job_id):
            raise JobRejected(f"job {job_id} is running; abort it first")
        self._deleted_ids.add(job_id)  # the scheduler must not pick it while its folder goes away
        self._specs.pop(job_id, None)
        await asyncio.to_thread(self.store.delete, job_id)

    def queued(self) -> list[str]:
        """Queued job ids in the order they will be considered."""
        return [r.job_id for r in self.store.all() if r.state is JobState.QUEUED]

    def aborted_job_ids(self) -> list[str]:
        return sorted(self._aborted_ids)

    @property
    def current(self) -> JobController | None:
        return self._current

    def controller_for(self, job_id: str) -> JobController:
        if self._current is None or self._current.record.job_id != job_id:
            raise JobRejected(f"job {job_id} is not running")
        return self._current

    # ---- the loop --------------------------------------------------------------------------------

    def _next_job(self) -> JobRecord | None:
        records = [r for r in self.store.all() if r.job_id not in self._aborted_ids | self._deleted_ids]
        for record in records:  # a job interrupted by a restart goes first
            if record.state is JobState.RUNNING:
                return record
        for record in records:
            if record.state is JobState.QUEUED and self._sites_ready(record):
                return record
        return None

    async def waiting_for(self, record: JobRecord) -> str:
        """Why a queued job is not running yet ("" for any other job, or one that can start). On the loop,
        where the registry changes; the spec is read in a thread (once: then it is kept)."""
        if record.state is not JobState.QUEUED or (meta := await self._meta(record)) is None:
            return ""
        return waiting_for(meta, self._registry.alive(), self._known_sites())

    async def unknown_sites(self, record: JobRecord) -> list[str]:
        """The sites a job names that this server has never heard of (site_selection.unknown_sites)."""
        meta = await self._meta(record)
        return [] if meta is None else unknown_sites(meta, self._known_sites())

    async def _meta(self, record: JobRecord) -> JobMeta | None:
        try:
            return (await asyncio.to_thread(self.spec, record.job_id)).meta
        except (OSError, ValueError):
            return None

    def _known_sites(self) -> set[str]:
        """The roster and every site that ever registered: a name outside it is most likely misspelt."""
        return self._roster | {s.name for s in self._registry.sessions()}

    def _sites_ready(self, record: JobRecord) -> bool:
        try:
            spec = self.spec(record.job_id)
        except (OSError, ValueError):
            return True  # let the run fail it, with the reason in its record, instead of skipping it forever
        return enough_sites(spec.meta, self._registry.alive())

    async def run_forever(self) -> None:
        while True:
            try:
                ran = await self._run_next()
            except Exception:  # e.g. the disk went away: log it and try again, the server stays up
                log.exception("scheduler: unexpected error; trying again in %.1f s", SCHEDULER_TICK_S)
                ran = False
            if ran:
                continue
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), SCHEDULER_TICK_S)
            except TimeoutError:
                pass

    async def _run_next(self) -> bool:
        """Run the next job whose sites are ready, if any; whether one ran."""
        record = await asyncio.to_thread(self._next_job)
        if record is None or self._picked_job_withdrawn(record):
            return False
        await self._run_one(record)
        return True

    def _picked_job_withdrawn(self, record: JobRecord) -> bool:
        """An admin may abort or delete the job while _next_job (in a thread) was choosing it."""
        return record.job_id in self._aborted_ids or record.job_id in self._deleted_ids

    async def _run_one(self, record: JobRecord) -> None:
        resumed = record.state is JobState.RUNNING
        record.state = JobState.RUNNING
        record.started_at = record.started_at or time.time()
        self.store.save(record)
        self._audit.append("job_started", job_id=record.job_id, name=record.name, resumed=resumed,
                           submitter=record.submitter)
        try:
            controller = JobController(record, self.spec(record.job_id), self.store, self._board,
                                       self._registry, self._audit, self._max_update_factor,
                                       self._aggregator_loader(record.job_id))
            self._current = controller
            await controller.run()
            record.state = JobState.FINISHED
        except JobAborted as e:
            record.state, record.error = JobState.ABORTED, str(e)
        except FedkitError as e:
            record.state, record.error = JobState.FAILED, str(e)
            log.error("job %s failed: %s", record.job_id, e)
        except asyncio.CancelledError:
            self._interrupted(record)
            raise
        except Exception as e:  # a bug must not take the scheduler down with it
            record.state, record.error = JobState.FAILED, f"internal error: {e}"
            log.exception("job %s failed with an internal error", record.job_id)
        self._ended(record)

    def _aggregator_loader(self, job_id: str) -> Callable[[Any], Any] | None:
        """Builds a job's own aggregator from its custom/ code, where server IT allowed job code here."""
        if not self._allow_job_aggregators:
            return None

        def load(config: Any) -> Any:
            code_dir = self.store.job_dir(job_id) / "server_code"
            if not code_dir.exists():
                safe_extract(self.store.archive(job_id), code_dir)
            self._audit.append("job_code_loaded_on_server", job_id=job_id, path=config.path)
            return load_job_aggregator(code_dir / CUSTOM_DIR, config)

        return load

    def _interrupted(self, record: JobRecord) -> None:
        """The server is stopping: the job stays `running` on disk, so the next start resumes it."""
        self._current = None
        self._board.forget(record.job_id)
        self._audit.append("job_interrupted", job_id=record.job_id, rounds_done=record.rounds_done)
        log.info("job %s interrupted by shutdown after %d rounds; it resumes on restart", record.job_id,
                 record.rounds_done)

    def _ended(self, record: JobRecord) -> None:
        self._current = None
        self._specs.pop(record.job_id, None)  # the scheduler asks only about queued jobs
        self._board.forget(record.job_id)
        record.finished_at = time.time()
        self.store.save(record)
        if record.state is JobState.ABORTED:
            self._aborted_ids.add(record.job_id)
        self._audit.append("job_ended", job_id=record.job_id, state=record.state.value, error=record.error)
        log.info("job %s %s after %d rounds%s", record.job_id, record.state.value, record.rounds_done,
                 f": {record.error}" if record.error else "")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
