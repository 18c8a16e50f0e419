"""The job queue and scheduler: jobs run one at a time, in submission order, each once the sites it
needs are online. A job that was running when the server stopped is resumed first on restart."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from ..audit import AuditLog
from ..errors import FedkitError, JobRejected
from ..identity import Identity
from ..job_spec import JobSpec, load_job_spec, read_zip_configs, sha256_hex, spec_to_json
from .controller import JobAborted, JobController
from .job_store import FINAL_STATES, JobRecord, JobState, JobStore
from .registry import Registry
from .taskboard import TaskBoard

log = logging.getLogger(__name__)

SCHEDULER_TICK_S = 0.5


class JobRunner:
    def __init__(self, store: JobStore, board: TaskBoard, registry: Registry, audit: AuditLog,
                 max_update_factor: float):
        self.store = store
        self._board = board
        self._registry = registry
        self._audit = audit
        self._max_update_factor = max_update_factor
        self._wakeup = asyncio.Event()
        self._current: JobController | None = None
        self._aborted_ids: set[str] = set()

    # ---- admin-facing ----------------------------------------------------------------------------

    def submit(self, submitter: Identity, archive: bytes, overrides: list[str]) -> JobRecord:
        """Validate and queue a job archive. Raises JobRejected with the file and field at fault."""
        spec = load_job_spec(read_zip_configs(archive), overrides)
        record = JobRecord(
            job_id=self.store.new_id(), name=spec.meta.name, state=JobState.QUEUED,
            submitter=submitter.name, submitter_org=submitter.org,
            submitter_role=submitter.role.value if submitter.role else "",
            submitted_at=time.time(), job_sha256=sha256_hex(archive),
            config_hash=sha256_hex(spec_to_json(spec).encode())[:16], overrides=list(overrides),
            rounds_total=spec.server.rounds,
        )
        self.store.create(archive, record)
        (self.store.job_dir(record.job_id) / "spec.json").write_text(spec_to_json(spec))
        self._wakeup.set()
        return record

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate(json.loads((self.store.job_dir(job_id) / "spec.json").read_text()))

    def abort(self, job_id: str) -> JobRecord:
        record = self.store.load(job_id)
        if record.state in FINAL_STATES:
            raise JobRejected(f"job {job_id} already {record.state.value}")
        self._aborted_ids.add(job_id)
        if self._current and self._current.record.job_id == job_id:
            self._current.abort()
        else:
            record.state, record.finished_at, record.error = JobState.ABORTED, time.time(), "aborted before start"
            self.store.save(record)
        return self.store.load(job_id)

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
        records = self.store.all()
        for record in records:  # a job interrupted by a restart goes first
            if record.state is JobState.RUNNING:
                return record
        for record in records:
            if record.state is JobState.QUEUED and self._sites_ready(record):
                return record
        return None

    def _sites_ready(self, record: JobRecord) -> bool:
        spec = self.spec(record.job_id)
        alive = self._registry.alive()
        if spec.meta.sites == "all":
            return len(alive) >= spec.meta.min_clients
        return len([s for s in spec.meta.sites if s in alive]) >= spec.meta.min_clients

    async def run_forever(self) -> None:
        while True:
            record = await asyncio.to_thread(self._next_job)
            if record is None:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), SCHEDULER_TICK_S)
                except TimeoutError:
                    pass
                continue
            await self._run_one(record)

    async def _run_one(self, record: JobRecord) -> None:
        resumed = record.state is JobState.RUNNING
        record.state = JobState.RUNNING
        record.started_at = record.started_at or time.time()
        self.store.save(record)
        self._audit.append("job_started", job_id=record.job_id, name=record.name, resumed=resumed,
                           submitter=record.submitter)
        controller = JobController(record, self.spec(record.job_id), self.store, self._board,
                                   self._registry, self._audit, self._max_update_factor)
        self._current = controller
        try:
            await controller.run()
            record.state = JobState.FINISHED
        except JobAborted as e:
            record.state, record.error = JobState.ABORTED, str(e)
        except FedkitError as e:
            record.state, record.error = JobState.FAILED, str(e)
            log.error("job %s failed: %s", record.job_id, e)
        except Exception as e:  # a bug must not take the scheduler down with it
            record.state, record.error = JobState.FAILED, f"internal error: {e}"
            log.exception("job %s failed with an internal error", record.job_id)
        finally:
            self._current = None
            self._board.forget(record.job_id)
            record.finished_at = time.time()
            self.store.save(record)
            if record.state is JobState.ABORTED:
                self._aborted_ids.add(record.job_id)
            self._audit.append("job_ended", job_id=record.job_id, state=record.state.value, error=record.error)
            log.info("job %s %s after %d rounds%s", record.job_id, record.state.value, record.rounds_done,
                     f": {record.error}" if record.error else "")
