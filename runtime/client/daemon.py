"""The client daemon: register with the server, heartbeat, fetch tasks, run them in the training
worker, filter and upload the result. Reconnects with exponential backoff and jitter whenever the
server or the link goes away, and keeps heartbeating while the worker trains.

It never imports torch and never unpickles: weights are safetensors files and bytes. NumPy, safetensors and
ml_dtypes are imported only by a task that needs them (a privacy chain with steps, wire quantization), never
at start: an idle site holds only what registering and heartbeating need, and a site that sends its weights
as they are never pays for them (tests/runtime/client/test_idle_imports.py, tests/e2e/test_lean_site.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import platform
import random
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import ValidationError

from .. import kit_config as kc
from ..audit import AuditLog
from ..crl import load_root_ca, parse_crl
from ..errors import (
    CertificateError,
    ConfigError,
    DpBudgetExhausted,
    FedkitError,
    JobRejected,
    PermissionDenied,
    ServerUnreachable,
    SessionExpired,
    UpdateRejected,
)
from ..heap import give_back_free_memory
from ..job_spec import MAX_JOB_ZIP_BYTES, TRAINING_WORKFLOWS, ClientJobConfig, safe_extract, sha256_hex
from ..plain_text import shown
from ..procs import LOG_FILE, log_tail_bytes
from ..proto import fedkit_pb2 as pb
from ..scalar_log import last_steps
from ..server_trust import refuse_revoked_server
from ..task_config import TaskConfig
from ..tasks import LOCAL_FIGURES, TaskKind, train_fields
from ..tls_diagnosis import diagnose
from ..transport import (
    CHUNK_BYTES,
    PayloadReceiver,
    TlsFiles,
    bulk_stub,
    call_errors,
    federation_stub,
    header_message,
    open_channel,
    parse_task_head,
    trailer_message,
    with_idle_timeout,
)
from . import outgoing
from .code_approval import ReceivedCode, received_code
from .code_review import is_kept, keep_for_review
from .disk_guard import DiskGuard, empty_folders
from .dp_ledger import SITE_LEDGER_FILE, DpLedger
from .job_folders import JobFolders
from .job_policy import JobPolicy
from .kept_updates import MIB, trim_kept
from .local_edits import LocalEdits
from .privacy_policy import EffectiveChain, PrivacyPolicy
from .report_policy import REPORT_KEY
from .sandbox import limits_of, sandbox_for_job
from .score_count import ScoresExhausted, count_score
from .worker_handle import WORKER_START_TIMEOUT_S, WorkerFailed, WorkerHandle, WorkerOutOfMemory, WorkerTimedOut
from .worker_threads import threads_per_rank

log = logging.getLogger("fedkit.client")
T = TypeVar("T")

VERSION = "0.1.0"
RPC_TIMEOUT_S = 30.0
POLL_WAIT_S = 20.0
UPLOAD_WAIT_LOG_S = 60.0  # how often a site still waiting for an upload slot says so in its log
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 15.0
SCALAR_STEPS_FILE = "scalar_steps.json"  # in a job's folder: each logged scalar's last step
STOPPING_NOTICE_S = 2.0  # how long a stopping site waits for the server to take its last heartbeat
ONCE_DEADLINE_S = 60.0  # --once: how long a site keeps trying to reach the server before it gives up
MAX_TASK_BYTES = 64 << 30
MAX_ID_CHARS = 128  # a job or task id from the server, used as a folder name


class Steps:
    """How long each step of one task took on this site, for the line that logs its result: where a slow
    round spends its time (download, worker, privacy, upload slot, upload), without a profiler."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started

    def __str__(self) -> str:
        return ", ".join(f"{step} {s:.2f} s" for step, s in self.seconds.items())


DISK_CLEANUP_WAIT_S = 120.0  # emptying a job's folders after it filled the disk (millions of files: slow)


@dataclass
class _Task:
    header: pb.TaskHeader
    round_dir: Path
    payload_path: Path | None  # the weights that came with the task, streamed straight to disk
    config: TaskConfig | None  # None: settings this site cannot read, or no room for the model (config_error)
    config_error: str = ""
    steps: Steps = field(default_factory=Steps)


class ClientDaemon:
    def __init__(self, kit: Path, cfg: kc.ClientKitConfig, settings: kc.SiteLocalSettings, ws: Path,
                 audit: AuditLog, policy: JobPolicy, stop: asyncio.Event, privacy: PrivacyPolicy | None = None,
                 once: bool = False):
        self._kit = kit
        self._cfg = cfg
        self._settings = settings
        self._ws = ws
        self._audit = audit
        self._policy = policy
        self._privacy = privacy if privacy is not None else PrivacyPolicy()
        self._stop = stop
        startup = kit / kc.STARTUP
        self._tls = TlsFiles(startup / cfg.cert, startup / cfg.key, startup / cfg.root_ca)
        self._target = f"{cfg.server_host}:{cfg.fed_learn_port}"
        self._session_id = ""
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._worker: WorkerHandle | None = None
        self._job_id = ""
        self._round = 0
        self._aborted: set[str] = set()
        self._current: asyncio.Task | None = None
        self.restart_requested = False
        self._rng: Any = None  # NumPy's Generator for the privacy chain: made when a chain first has steps
        self._once = once  # --once: give up instead of retrying for ever when the server cannot be reached
        self._registered_once = False
        # (job, reason) of each job this site's policy refused, audited once (job_refused): the server
        # keeps tasking a refusing site every round of the job, and each task is refused again
        self._refused: set[tuple[str, str]] = set()
        self._local_edits = LocalEdits(kit / kc.LOCAL)
        self._disk = DiskGuard(ws, settings.sandbox.min_free_disk_mb)
        self._disk_watch: asyncio.Task | None = None
        self._disk_stopped: dict[str, str] = {}  # job -> why the disk guard stopped it: no more of its tasks
        self._cleaning: set[asyncio.Task] = set()  # disk guards emptying a stopped job's folders (held: not GC'd)
        self._keep_refused: set[str] = set()  # jobs told once that this site keeps none of their models
        self._declined_jobs: set[str] = set()  # jobs this site's policy refuses whole (the server is told)
        self._key_withheld: set[str] = set()  # jobs whose key metric this site's reports policy withholds (warned)
        self._outage = Outage(time.monotonic)
        self._instance_id = secrets.token_hex(8)  # this process: a copy of the kit elsewhere has another

    # ---- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.to_thread(self._trim_kept_updates)  # keep_updates_max_mb may have been lowered since
        channel = open_channel(self._tls, self._cfg.server_host, self._cfg.fed_learn_port)
        self._stub = federation_stub(channel)
        self._bulk = bulk_stub(channel)  # tasks and results: the model bytes as raw messages
        backoff = BACKOFF_START_S
        started = asyncio.get_running_loop().time()
        try:
            while not self._stop.is_set():
                try:
                    await self._register()
                    self._registered_once = True
                    self._outage.ended()
                    backoff = BACKOFF_START_S
                    await self._session()
                except SessionExpired as e:
                    log.warning("%s; retrying in up to %.1f s", e, backoff)
                except (ServerUnreachable, CertificateError) as e:
                    # gRPC words a refused certificate like a network fault ("Socket closed"): a handshake
                    # of our own tells which side's certificate is the problem, or that nothing answers
                    diagnosis = await asyncio.to_thread(diagnose, self._tls, self._cfg.server_host,
                                                        self._cfg.fed_learn_port)
                    if isinstance(e, CertificateError) or (diagnosis and diagnosis.is_certificate_problem):
                        message = diagnosis.message if diagnosis and diagnosis.is_certificate_problem else str(e)
                        self._outage.failed(message, logging.ERROR)  # a revoked site retries for ever: once a minute
                        self._give_up_if_once(CertificateError(message), started, at_once=True)
                        backoff = BACKOFF_MAX_S  # a person must act: retry slowly meanwhile
                    else:
                        self._outage.failed(f"{e}; retrying in up to {backoff:.1f} s")
                        self._give_up_if_once(e, started)
                except HeldElsewhere as e:  # another copy of this kit holds the site: it may stop any time
                    self._outage.failed(f"{e}; retrying in up to {backoff:.1f} s")
                except FedkitError as e:  # worth a line, and a slower retry
                    log.error("%s", e)
                    backoff = BACKOFF_MAX_S
                # full jitter: many sites coming back at once do not hammer the server in step
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), random.uniform(0, backoff))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            await self._stop_worker()
            await self._say_stopping()
            await channel.close()

    def _give_up_if_once(self, error: FedkitError, started: float, at_once: bool = False) -> None:
        """With --once, a site that could not register stops (the error reaches start.sh's exit code)
        instead of retrying for ever: at once for a certificate problem, else after ONCE_DEADLINE_S."""
        if not self._once or self._registered_once:
            return
        if at_once or asyncio.get_running_loop().time() - started > ONCE_DEADLINE_S:
            raise error

    async def _register(self) -> None:
        info = {"hostname": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
                "gpus": ",".join(map(str, self._settings.gpus))}
        await refuse_revoked_server(self._stub, self._tls, self._cfg.server_host, self._cfg.fed_learn_port, self._ws)
        with _held_elsewhere(), call_errors("register", self._target):
            reply = await self._stub.Register(
                pb.RegisterRequest(runtime_version=VERSION, host_info_json=json.dumps(info),
                                   instance_id=self._instance_id), timeout=RPC_TIMEOUT_S)
        self._session_id = reply.session_id
        self._heartbeat_interval_s = reply.heartbeat_interval_s or self._heartbeat_interval_s
        log.info("registered with %s as %s", self._target, self._cfg.name)

    async def _session(self) -> None:
        """Heartbeat, presence and task loops side by side until one fails or we are told to stop."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        presence = asyncio.create_task(self._presence(), name="presence")
        tasks = asyncio.create_task(self._task_loop(), name="tasks")
        stop = asyncio.create_task(self._stop.wait())
        loops = (heartbeat, presence, tasks, stop)
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception():
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _say_stopping(self) -> None:
        """The last heartbeat: this site stops on purpose (stop.sh, a shutdown), so the server shows it stopped,
        not dead, and stops waiting for it at once. Best effort: a server that does not answer is not waited
        for."""
        if not self._session_id or not self._registered_once or not self._stop.is_set():
            return  # not a stop asked for (a crash, a full disk): the server must count it dead, not stopped
        with contextlib.suppress(FedkitError, asyncio.TimeoutError), call_errors("heartbeat", self._target):
            await self._stub.Heartbeat(pb.HeartbeatRequest(session_id=self._session_id, stopping=True),
                                       timeout=STOPPING_NOTICE_S)

    async def _presence(self) -> None:
        """Hold the presence stream open: the server learns at once when this site's connection drops."""
        with call_errors("presence", self._target):
            async for _ in self._stub.Presence(pb.PresenceRequest(session_id=self._session_id)):
                pass
        raise SessionExpired("server closed this site's presence stream; registering again")

    # ---- heartbeat -------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        log_tail = ""
        while True:
            with call_errors("heartbeat", self._target):
                reply = await self._stub.Heartbeat(pb.HeartbeatRequest(
                    session_id=self._session_id, job_id=self._job_id, round=self._round, log_tail=log_tail),
                    timeout=min(max(2 * self._heartbeat_interval_s, 5.0), RPC_TIMEOUT_S))
            if reply.must_reregister:
                raise SessionExpired("server lost our session; registering again")
            for job_id in reply.aborted_jobs:
                await self._abandon_job(job_id)
            if reply.control in ("shutdown", "restart"):
                log.warning("server asked this site to %s", reply.control)
                self._audit.append("control_received", control=reply.control)
                self.restart_requested = reply.control == "restart"
                self._stop.set()
            for name in [] if self._stop.is_set() else await asyncio.to_thread(self._local_edits.changed):
                log.warning("local/%s changed since this site started; it still applies the settings it started "
                            "with: restart it (startup/stop.sh, then start.sh; or restart client %s from the "
                            "console) to apply the new ones", name, self._cfg.name)
                self._audit.append("local_settings_changed", file=f"local/{name}")
            log_tail = ""
            if reply.control == "send_log":  # an admin ran tail_log for this site: answer at once
                self._audit.append("control_received", control=reply.control)
                # the site's folders masked as in failure reports: the server need not learn its disk layout
                log_tail = _site_paths_hidden(await asyncio.to_thread(_log_tail, self._ws / LOG_FILE),
                                              _site_places(self._kit, self._settings.data_root)) \
                    if self._settings.send_log else NO_LOG
                continue
            await asyncio.sleep(self._heartbeat_interval_s)

    async def _abandon_job(self, job_id: str) -> None:
        if job_id in self._aborted:
            return
        self._aborted.add(job_id)
        if self._job_id == job_id:
            log.info("job %s ended on the server; stopping its worker", job_id)
            if self._current is not None:
                self._current.cancel()
            if self._worker is not None and self._worker.job_id == job_id:
                self._worker.kill()
            await self._stop_worker(job_id)
            if self._job_id == job_id:  # the next job's task may have begun while the worker stopped
                self._job_id, self._round = "", 0
        with contextlib.suppress(JobRejected, OSError):  # the job is over: its privacy reference goes, and
            folders = JobFolders(self._ws / "jobs" / _safe_name(job_id))  # what its code left in scratch/outbox
            (folders.inbox / LAST_GLOBAL_FILE).unlink(missing_ok=True)
            await asyncio.to_thread(empty_folders, (folders.scratch, folders.outbox))
            await asyncio.to_thread(shutil.rmtree, folders.reuse, True)

    # ---- tasks -----------------------------------------------------------------------------------

    async def _task_loop(self) -> None:
        while True:
            task = await self._poll()
            if task is None:
                continue
            if task.header.job_id in self._aborted:
                continue
            self._current = asyncio.current_task()
            try:
                await self._do_task(task)
            except asyncio.CancelledError:
                if task.header.job_id not in self._aborted:
                    raise
                log.info("task %s of aborted job %s dropped", task.header.task_name, task.header.job_id)
                self._uncancel()
            finally:
                self._current = None

    @staticmethod
    def _uncancel() -> None:
        current = asyncio.current_task()
        if current is not None:
            while current.cancelling():
                current.uncancel()

    async def _poll(self) -> _Task | None:
        with call_errors("get task", self._target):
            call = self._bulk.GetTask(pb.GetTaskRequest(session_id=self._session_id, wait_s=POLL_WAIT_S))
            try:
                first = parse_task_head(await asyncio.wait_for(anext(aiter(call)), POLL_WAIT_S + RPC_TIMEOUT_S))
            except TimeoutError:
                call.cancel()
                raise ServerUnreachable(f"get task: {self._target} did not answer a long poll in time") from None
            stream = with_idle_timeout(call, what="model download")
            if first.WhichOneof("kind") != "header":
                return None
            h = first.header
            config, config_error = _decode_task_config(h.config_json)
            round_dir = (JobFolders(self._ws / "jobs" / _safe_name(h.job_id)).inbox
                         / _round_folder(config, h.round, h.task_name))
            try:
                round_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a full disk (a directory needs a block on most file systems): fail the task
                async for _chunk in stream:  # take the model, keep none of it
                    pass
                return _Task(header=h, round_dir=round_dir, payload_path=None, config=None,
                             config_error=f"cannot store the task's model under {round_dir}: {e.strerror or e}")
            path = round_dir / "global_in.safetensors"
            steps = Steps()
            room = self._disk.room_bytes()
            if h.payload_bytes and room is not None and h.payload_bytes > room:  # fail before writing a byte
                call.cancel()
                return _Task(header=h, round_dir=round_dir, payload_path=None, config=None,
                             config_error=f"the task's model ({h.payload_bytes >> 20} MiB) would take the disk "
                                          "holding this site's workspace below local/site.yml "
                                          f"sandbox.min_free_disk_mb ({self._disk.min_free_mb}); not downloaded")
            if h.payload_bytes:
                part = path.with_suffix(".part")
                try:
                    with self._received_file(h.job_id, part) as f:
                        # TLS already guarantees integrity on the way; the server's hash is in the audit
                        # record of this task, and the size is checked. Hashing again here would cost
                        # every site a full pass over the model each round.
                        receiver = PayloadReceiver(h.payload_bytes, MAX_TASK_BYTES, h.payload_sha256, sink=f,
                                                   verify_sha256=False)
                        with steps.timed("download"):
                            async for chunk in stream:
                                await asyncio.to_thread(receiver.add, chunk)  # raw bytes; file I/O off the loop
                            receiver.finish()
                            f.truncate()  # a file written over may have held a longer model
                except OSError as e:  # the site's disk is full: fail this task, not the daemon (found by the soak)
                    part.unlink(missing_ok=True)
                    async for _chunk in stream:  # the download itself is fine: take the rest, keep none of it
                        pass
                    return _Task(header=h, round_dir=round_dir, payload_path=None, config=None,
                                 config_error=f"cannot store the task's model under {round_dir}: {e.strerror or e}")
                except BaseException:
                    call.cancel()
                    part.unlink(missing_ok=True)  # never leave a partial model behind
                    raise
                part.replace(path)  # only a complete, verified model ever gets the real name
                # the transfer's buffers back to the OS while the worker (which needs the memory) trains
                await asyncio.to_thread(give_back_free_memory)
        return _Task(header=h, round_dir=round_dir, payload_path=path if h.payload_bytes else None,
                     config=config, config_error=config_error, steps=steps)

    async def _do_task(self, task: _Task) -> None:
        h = task.header
        self._job_id, self._round = h.job_id, h.round
        job_dir = self._ws / "jobs" / _safe_name(h.job_id)
        round_dir = task.round_dir
        self._audit.append("task_received", job_id=h.job_id, task=h.task_name, round=h.round, task_id=h.task_id,
                           payload_sha256=h.payload_sha256)
        keep_updates = False
        try:
            if task.config is None:
                raise JobRejected(task.config_error)
            if h.job_id in self._disk_stopped:  # it filled the disk here once: none of its code runs again
                raise JobRejected(self._disk_stopped[h.job_id])
            kind = _task_kind(h.task_name)
            client_cfg = ClientJobConfig.model_validate(task.config.client)
            keep_updates = self._keeps_updates(h.job_id, client_cfg)
            config = task.config.model_dump(mode="json")
            # a refusal comes before any job code; in a thread: the first chain with filters imports NumPy
            try:
                chain = await asyncio.to_thread(self._privacy.chain_for, h.job_id, client_cfg.filters)
            except JobRejected as e:  # local/privacy.yml: a floor under `on_weaker_job: refuse`, for every task
                self._job_refused(h, config, "privacy", e, declines=True)
                raise
            try:
                if kind is TaskKind.INIT:
                    self._privacy.check_builds_initial_model()
                # a spent budget stops the job's code, and every kind of task: a validation sends no weights,
                # but scores of weights the server chose read the data too, outside any budget
                await self._dp_counted(h.job_id, h.task_name, h.round, self._check_dp_room, h.job_id, chain)
                if kind in (TaskKind.TRAIN, TaskKind.VALIDATE):  # each scores a model on the data first
                    await asyncio.to_thread(count_score, self._ws, h.job_id, self._privacy.scores)
            except JobRejected as e:  # building round 0 here: this task only; a spent budget or cap: the whole
                self._job_refused(h, config, "privacy", e)  # job (below, with a budget spent at an upload)
                raise
            await self._ensure_job(h, config, job_dir, client_cfg)
            if kind is TaskKind.PREPARE:  # the job's worker is running for its first real task: no answer
                return
            n_samples, metrics, payload = await self._execute(h, kind, task, round_dir, client_cfg, chain)
            # what the job's code reported leaves as the site's `reports:` allow; the privacy chain did the weights
            reports = self._privacy.reports
            sent = reports.apply(metrics, task.config.key_metric.name)
            if sent.get(REPORT_KEY, {}).get("key_metric_withheld") and h.job_id not in self._key_withheld:
                self._key_withheld.add(h.job_id)
                log.warning("job %s: local/privacy.yml reports withholds its key metric '%s': this site's scores "
                            "do not count toward the job's best model", h.job_id, task.config.key_metric.name)
            await self._submit(h, reports.sample_count(n_samples), sent, payload, steps=task.steps)
        # UpdateRejected: the job's code wrote weights the privacy step cannot read; only this task fails
        # OSError: the site's disk full or its job folder unwritable; fails this task, not the daemon (the soak)
        except (WorkerFailed, JobRejected, ConfigError, UpdateRejected, OSError) as e:
            if isinstance(e, WorkerFailed) and h.job_id in self._disk_stopped:  # killed by the disk guard
                e = JobRejected(self._disk_stopped[h.job_id])
                await self._disk_cleaned(h.job_id)
            if isinstance(e, DpBudgetExhausted | ScoresExhausted):  # before the job's code ran, or at its upload
                self._declined_jobs.add(h.job_id)  # (another job took the site budget's last room): no more of it
            log.error("job %s %s round %d failed: %s", h.job_id, h.task_name, h.round, e)
            self._audit.append("task_failed", job_id=h.job_id, task=h.task_name, round=h.round, reason=str(e))
            if h.task_name != TaskKind.PREPARE:  # a prepare is never answered: the job's first task says it
                # what the job's code could shape: its worker's errors and exit, the weights it wrote
                await self._report_failure(h, self._privacy.reports.error_text(
                    _site_paths_hidden(str(e), _site_places(self._kit, self._settings.data_root)),
                    _shaped_by_job(e)), declines=self._declines(h.job_id))
        finally:
            if not keep_updates:
                await asyncio.to_thread(self._remove_task_folder, round_dir)
            else:
                await asyncio.to_thread(self._trim_kept_updates)

    def _scalars(self, job_id: str, reply: dict[str, Any]) -> dict[str, Any]:
        """The learner's logged scalars (checked by worker_replies), sent with the result's metrics; their last
        steps are kept in the job's folder, so a restarted worker's curves go on from there."""
        if not reply.get("scalars"):
            return {}
        path = self._ws / "jobs" / _safe_name(job_id) / SCALAR_STEPS_FILE
        with contextlib.suppress(OSError):
            path.write_text(json.dumps(last_steps(_read_steps(path), reply["scalars"])))
        return {"scalars": [list(p) for p in reply["scalars"]]}

    def _keeps_updates(self, job_id: str, client_cfg: ClientJobConfig) -> bool:
        """Whether this task's models stay on the site: the job asks (keep_updates), the site allows
        (local/site.yml keep_updates_max_mb above 0)."""
        if not client_cfg.keep_updates:
            return False
        if self._settings.keep_updates_max_mb == 0:
            if job_id not in self._keep_refused:
                self._keep_refused.add(job_id)
                log.info("job %s asks to keep its models on this site; local/site.yml keep_updates_max_mb is 0: "
                         "none are kept", job_id)
            return False
        return True

    def _trim_kept_updates(self) -> None:
        """The oldest kept task folders go until all jobs' fit local/site.yml keep_updates_max_mb."""
        cap = self._settings.keep_updates_max_mb
        removed = trim_kept(self._ws / "jobs", cap)
        if removed:
            freed = sum(f.bytes for f in removed) / MIB
            log.info("removed %d kept task folder(s), %.0f MiB, oldest first (%s): the models jobs keep here are "
                     "capped at local/site.yml keep_updates_max_mb (%d MiB)", len(removed), freed,
                     ", ".join(str(f.path.relative_to(self._ws)) for f in removed[:3]) + (" ..." if len(removed) > 3
                                                                                          else ""), cap)
            self._audit.append("kept_updates_removed", folders=[str(f.path.relative_to(self._ws)) for f in removed],
                               bytes=sum(f.bytes for f in removed), max_mb=cap)

    def _received_file(self, job_id: str, path: Path) -> BinaryIO:
        """Where a task's model is downloaded to: over the job's spare model when its worker let it go
        (reused_files.SpareModel), else a new file."""
        if self._worker is not None and self._worker.job_id == job_id:
            return self._worker.received.open(path)
        return path.open("wb")

    def _remove_task_folder(self, round_dir: Path) -> None:
        """Remove a finished task's folder, keeping the copy of the worker's result to write the next over."""
        if self._worker is not None:
            self._worker.results.reclaim(round_dir)
        else:
            shutil.rmtree(round_dir, ignore_errors=True)

    async def _ensure_job(self, h: pb.TaskHeader, config: dict[str, Any], job_dir: Path,
                          client_cfg: ClientJobConfig) -> None:
        """Fetch, check and unpack the job folder, and start its worker, once per job."""
        if self._worker is not None and self._worker.job_id == h.job_id and self._worker.alive:
            return
        await self._stop_worker()
        submitter = config.get("submitter", {})
        try:
            self._policy.check(h.job_id, submitter)  # raises JobRejected with the site's reason
        except JobRejected as e:  # local/job_policy.yml allowed_orgs / allowed_roles
            self._job_refused(h, config, "org_role", e, declines=True)
            raise
        code_dir = JobFolders(job_dir).code
        if self._policy.requires_code_check:  # extract afresh: what runs must be exactly what was approved
            await asyncio.to_thread(shutil.rmtree, code_dir, True)
            if code_dir.exists():  # a file left there would run beside the approved code (custom/ is imported)
                raise JobRejected(f"job {h.job_id}: its earlier code folder {code_dir} could not be removed; "
                                  "remove it by hand so only approved code runs")
        if not code_dir.exists():
            parts, received = [], 0
            with call_errors("get job", self._target):
                call = self._stub.GetJob(pb.GetJobRequest(session_id=self._session_id, job_id=h.job_id))
                async for chunk in with_idle_timeout(call, what="job download"):
                    received += len(chunk.data)
                    if received > MAX_JOB_ZIP_BYTES:  # in memory: a server streaming on would take the host's
                        call.cancel()
                        raise JobRejected(f"job {h.job_id}: its archive passed {MAX_JOB_ZIP_BYTES >> 20} MiB while "
                                          "it came; refused")
                    parts.append(chunk.data)
            archive = b"".join(parts)
            digest = await asyncio.to_thread(sha256_hex, archive)
            if h.job_sha256 and digest != h.job_sha256:
                raise JobRejected(f"job {h.job_id}: archive hash {digest[:12]} differs from the announced one")
            code = await asyncio.to_thread(received_code, h.job_id, archive, config, client_cfg)
            try:
                approval = await asyncio.to_thread(self._approve_code, code)
            except JobRejected as e:  # local/job_policy.yml code:
                self._job_refused(h, config, "code", e, job_sha256=digest, code_sha256=code.code_sha256,
                                  declines=True)
                if await self._keep_for_review(h, config, archive, digest, code, str(e)):
                    raise JobRejected(f"{e}; the site keeps the code for its IT to review") from None
                raise
            await asyncio.to_thread(safe_extract, archive, code_dir)
            self._audit.append("job_received", job_id=h.job_id, job_name=config.get("job_name", ""),
                               job_sha256=digest, code_sha256=code.code_sha256, code_approval=approval,
                               submitter=submitter)
        self._worker = await self._start_worker(h.job_id, JobFolders(job_dir), client_cfg)

    async def _keep_for_review(self, h: pb.TaskHeader, config: dict[str, Any], archive: bytes, digest: str,
                               code: ReceivedCode, reason: str) -> bool:
        """Keep code the code rule refused, as received, for site IT to read before approving its hash
        (startup/review_job.sh); a site that cannot keep it (its disk) still refuses the job."""
        facts = {"job_name": config.get("job_name", ""), "submitter": config.get("submitter", {}),
                 "refused_at": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason,
                 "code_sha256": code.code_sha256, "job_sha256": digest,
                 "learner_to_run": code.learner_to_run}
        job = _safe_name(h.job_id)
        already = is_kept(self._ws, job)
        try:
            kept = await asyncio.to_thread(keep_for_review, self._ws, job, archive, facts)
        except OSError as e:
            log.warning("job %s: its refused code could not be kept for review: %s", h.job_id, e)
            return False
        if kept and not already:
            log.info("job %s: its refused code is kept for review: startup/review_job.sh %s", h.job_id, h.job_id)
            self._audit.append("code_kept_for_review", job_id=h.job_id, code_sha256=code.code_sha256)
        return kept

    def _job_refused(self, h: pb.TaskHeader, config: dict[str, Any], rule: str, error: JobRejected,
                     job_sha256: str = "", code_sha256: str = "", declines: bool = False) -> None:
        """Audit that this site's own policy refused a job (`rule`: org_role, code or privacy): who submitted
        it, its hashes, and the reason; once per job and reason, though the server tasks a refusing site again
        each round. The archive's hash is the one the server announced unless the site fetched the archive;
        its code hash is known ("" otherwise) only once the archive was fetched, which only the code rule does."""
        reason = str(error)
        if declines:  # a refusal of every task of the job, until the site restarts with other settings
            self._declined_jobs.add(h.job_id)
        if (h.job_id, reason) in self._refused:
            return
        self._refused.add((h.job_id, reason))
        self._audit.append("job_refused", job_id=h.job_id, job_name=config.get("job_name", ""),
                           submitter=config.get("submitter", {}), job_sha256=job_sha256 or h.job_sha256,
                           code_sha256=code_sha256, rule=rule, reason=reason)

    async def _start_worker(self, job_id: str, folders: JobFolders, client_cfg: ClientJobConfig) -> WorkerHandle:
        """Start the job's worker in this site's sandbox; audit the backend and its limits, or the refusal."""
        limits = limits_of(self._settings.sandbox)
        self._disk.check_room(job_id)
        sandbox = await sandbox_for_job(self._settings.sandbox, self._audit, job_id)
        await asyncio.to_thread(folders.create)
        nproc = self._settings.nproc or max(1, len(self._settings.gpus))
        worker_threads = threads_per_rank(self._settings, nproc)
        # the job's code runs from the worker's start (its imports, its learner's constructor): the site's
        # cap on how long job code may run at once holds there too, and so does the job's own task timeout
        cap = self._settings.sandbox.max_task_s
        ready_timeout_s = min(WORKER_START_TIMEOUT_S, client_cfg.task_timeout_s, cap or WORKER_START_TIMEOUT_S)
        try:
            worker = await WorkerHandle.start(
                sandbox=sandbox, python=self._settings.python or "", kit=self._kit, folders=folders,
                site=self._cfg.name, job_id=job_id, data_root=self._settings.data_root or "",
                gpus=self._settings.gpus, learner=client_cfg.learner.path, learner_args=client_cfg.learner.args,
                log_path=self._ws / f"worker_{job_id}.log", nproc=nproc, limits=limits,
                max_result_bytes=MAX_TASK_BYTES, threads=worker_threads, ready_timeout_s=ready_timeout_s,
                room=self._disk.room_bytes, scalar_steps=_read_steps(folders.root / SCALAR_STEPS_FILE))
        except WorkerTimedOut as e:
            capped = (": this site's cap (local/site.yml sandbox.max_task_s)"
                      if cap is not None and ready_timeout_s == cap
                      else ": the job's task_timeout_s" if ready_timeout_s == client_cfg.task_timeout_s else "")
            raise WorkerTimedOut(f"{e} while starting (importing the job's code, building its learner){capped}") \
                from None
        self._audit.append("worker_started", job_id=job_id, backend=sandbox.name, threads=worker_threads,
                           limits=await asyncio.to_thread(sandbox.describe_limits, limits))
        self._watch_disk(job_id, folders, worker)
        return worker

    async def _execute(self, h: pb.TaskHeader, kind: TaskKind, task: _Task, round_dir: Path,
                       client_cfg: ClientJobConfig, chain: EffectiveChain) -> tuple[int, dict[str, Any], Path | None]:
        """Run the task in the worker; returns n_samples, metrics and the file of weights to send (always
        the output of the site's privacy chain: runtime.client.outgoing)."""
        assert self._worker is not None and task.config is not None
        asked = min(h.timeout_s or client_cfg.task_timeout_s, client_cfg.task_timeout_s)  # the job's own
        cap = self._settings.sandbox.max_task_s
        timeout_s = asked if cap is None else min(asked, cap)
        try:
            return await self._run_in_worker(h, kind, task, round_dir, client_cfg, chain, timeout_s)
        except WorkerTimedOut as e:
            if timeout_s < asked:
                raise WorkerTimedOut(f"{e}: this site's cap (local/site.yml sandbox.max_task_s), below the "
                                     f"{asked:g} s the job allows") from None
            raise

    async def _run_in_worker(self, h: pb.TaskHeader, kind: TaskKind, task: _Task, round_dir: Path,
                             client_cfg: ClientJobConfig, chain: EffectiveChain,
                             timeout_s: float) -> tuple[int, dict[str, Any], Path | None]:
        assert self._worker is not None and task.config is not None
        reference = round_dir.parent / LAST_GLOBAL_FILE  # the last global model this site trained on
        if kind is TaskKind.INIT:
            out = round_dir / "initial.safetensors"
            with task.steps.timed("worker"):
                await self._worker.call_writing({"op": kind.value}, out, timeout_s)
            with task.steps.timed("privacy"):
                return 0, await self._outgoing(h, kind, out, chain), out.with_suffix(SENT_SUFFIX)
        if kind is TaskKind.SUBMIT_MODEL:
            out = round_dir / "local_model.safetensors"
            with task.steps.timed("worker"):
                await self._worker.call_writing({"op": kind.value}, out, timeout_s)
            with task.steps.timed("privacy"):
                metrics = await self._outgoing(h, kind, out, chain, reference)
            self._audit.append("local_model_shared", job_id=h.job_id, round=h.round)
            return 0, metrics, out.with_suffix(SENT_SUFFIX)
        received = task.payload_path
        if received is None:
            raise JobRejected(f"{kind.value} task came without weights")
        if task.config.wire_dtype != "float32":  # the worker sees the model, never the wire encoding
            with task.steps.timed("decode"):
                await asyncio.to_thread(_decode_wire, received)
        await asyncio.to_thread(self._worker.sandbox.share_file, received)  # job code may run as another user
        if kind is TaskKind.VALIDATE:
            with task.steps.timed("worker"):
                reply = await self._worker.call({"op": kind.value, "weights": str(received)}, timeout_s)
            return 0, {"validation": reply["metrics"], **self._scalars(h.job_id, reply)}, None
        out = round_dir / "delta_out.safetensors"
        config = task.config
        command = {"op": kind.value, "weights": str(received), "round": h.round,
                   **train_fields(config.algorithm, config.key_metric, config.keep_best_local)}
        with contextlib.suppress(OSError):  # the model trained on last time: may a later download reuse it?
            command["release"] = reference.stat().st_ino
        with task.steps.timed("worker"):
            reply = await self._worker.call_writing(command, out, timeout_s)
        with task.steps.timed("privacy"):
            await asyncio.to_thread(self._worker.received.retire, reference, reply.get("held", True))
            await asyncio.to_thread(_keep_reference, received, reference)
            report = await self._outgoing(h, kind, out, chain, reference)  # the delta must fit the model received
        sent = out.with_suffix(SENT_SUFFIX)
        if self._keeps_updates(h.job_id, client_cfg):
            await asyncio.to_thread(shutil.copyfile, sent, round_dir / "update_sent.safetensors")
            (round_dir / "update_sent.json").write_text(json.dumps({"n_samples": reply["n_samples"],
                                                                   "round": h.round, "task_id": h.task_id}))
        metrics = {"train": reply["metrics"], "validation": reply["validation"], "local": _local_figures(reply, config),
                   **({"local_validation": reply["local_validation"]} if reply.get("local_validation") else {}),
                   **self._scalars(h.job_id, reply)}
        if config.wire_dtype != "float32":  # after the privacy chain: what leaves is its output, encoded
            with task.steps.timed("encode"):
                sent, digest, error = await asyncio.to_thread(_encode_wire, sent, config.wire_dtype)
            report = {"privacy": {**report["privacy"], "payload_sha256": digest}}  # the bytes that leave
            metrics["wire"] = error.as_metrics()
        return int(reply["n_samples"]), {**metrics, **report}, sent

    async def _outgoing(self, h: pb.TaskHeader, task: TaskKind, raw: Path, chain: EffectiveChain,
                        reference: Path | None = None) -> dict[str, Any]:
        """Apply the privacy chain to `raw`, writing what may leave next to it; the result's "privacy".
        A gaussian_dp upload is counted in the job's DP ledger and the site's; past a budget it is not written,
        and the refusal is audited (dp_budget_exhausted) before the task fails. The job is the task's, never
        the daemon's current one: an abort may move that on while this runs."""
        try:
            report = await self._dp_counted(h.job_id, task, h.round, outgoing.prepare, task, raw,
                                            raw.with_suffix(SENT_SUFFIX), chain, self._generator, reference,
                                            ledger=self._ledger(h.job_id))
        except ValidationError as e:  # what the job wrote broke a limit of the report: this task fails, not the site
            raise UpdateRejected(f"the site could not describe what would leave ({e.error_count()} limit(s) of its "
                                 "privacy report broken); nothing was sent") from None
        return {"privacy": report.model_dump(mode="json", exclude_none=True)}

    async def _dp_counted(self, job_id: str, task: str, round: int, fn: Callable[..., T], *args: Any,
                          **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a thread; a DP budget it finds spent is audited (dp_budget_exhausted)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except DpBudgetExhausted as e:
            self._audit.append("dp_budget_exhausted", job_id=job_id, task=task, round=round, **e.details)
            raise

    def _check_dp_room(self, job_id: str, chain: EffectiveChain) -> None:
        """Raise DpBudgetExhausted when the job's next release through `chain` would pass a budget."""
        release = chain.dp_release()
        if release is not None and (chain.dp_budget is not None or chain.dp_site_budget is not None):
            self._ledger(job_id).check_room(release[0], chain.dp_budget, chain.dp_site_budget)

    def _ledger(self, job_id: str) -> DpLedger:
        """The job's DP ledger on this site, with the site's ledger of all jobs."""
        return DpLedger(self._ws / "jobs" / _safe_name(job_id), job_id, self._ws / SITE_LEDGER_FILE)

    def _generator(self) -> Any:
        """The site's one random Generator for its privacy filters, made (and NumPy imported) on first use."""
        if self._rng is None:
            import numpy as np

            self._rng = np.random.default_rng()
        return self._rng

    def _approve_code(self, code: ReceivedCode) -> str:
        """local/job_policy.yml `code:` on the code as received; signers are checked against this site's
        own root CA and, when site IT placed the study's crl.pem in local/, its revocations."""
        if not self._policy.requires_code_check:
            return self._policy.check_code(code, b"")
        try:
            revoked = _local_revocations(self._kit / kc.LOCAL / kc.REVOCATION_LIST, self._tls.root_ca)
        except CertificateError as e:
            raise JobRejected(f"cannot check job code signatures: {e}") from None
        return self._policy.check_code(code, self._tls.root_ca.read_bytes(), revoked)

    async def _reserve_upload(self, task_id: str) -> str:
        """Wait (in bounded long polls) for an upload slot on the server; returns its lease. A long wait is
        logged once a minute: sites queue for slots by design, but a site that never gets one must show."""
        loop = asyncio.get_running_loop()
        started = logged = loop.time()
        while True:
            with call_errors("reserve upload", self._target):
                reply = await self._stub.ReserveUpload(
                    pb.ReserveRequest(session_id=self._session_id, task_id=task_id, wait_s=POLL_WAIT_S),
                    timeout=POLL_WAIT_S + RPC_TIMEOUT_S)
            if reply.lease_id:
                return reply.lease_id
            if loop.time() - logged >= UPLOAD_WAIT_LOG_S:
                logged = loop.time()
                log.info("waiting %.0f s so far for an upload slot on the server (its uploads are all busy)",
                         logged - started)

    async def _submit(self, h: pb.TaskHeader, n_samples: int, metrics: dict[str, Any], payload: Path | None,
                      steps: Steps | None = None) -> None:
        """Stream the result from disk; its hash follows as a trailer. The privacy step hashed what it wrote
        (the header carries that hash, and the server checks the bytes it receives against it), so the
        bytes are hashed again here only when no such hash came with them."""
        steps = steps if steps is not None else Steps()
        size = payload.stat().st_size if payload is not None else 0
        lease = ""
        if size:
            with steps.timed("upload slot"):
                lease = await self._reserve_upload(h.task_id)
        privacy = metrics.get("privacy") or {}
        known = privacy.get("payload_sha256", "")
        metrics_json = json.dumps(metrics)
        header = pb.ResultHeader(session_id=self._session_id, task_id=h.task_id, n_samples=n_samples,
                                 metrics_json=metrics_json, payload_bytes=size, lease_id=lease,
                                 payload_sha256=known)
        digest = None if known else hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            yield header_message(header)
            if payload is None:
                return
            with payload.open("rb") as f:
                while piece := await asyncio.to_thread(_read_hashed, f, digest):  # reading, hashing: off the loop
                    yield piece  # raw, as read: no protobuf copy
            yield trailer_message(known or digest.hexdigest())

        with call_errors("submit result", self._target), steps.timed("upload"):
            reply = await self._bulk.SubmitResult(chunks(), timeout=RPC_TIMEOUT_S + size / 1e6)
        if size:
            await asyncio.to_thread(give_back_free_memory)  # an idle site holds no transfer buffers
        size_sent, digest_hex = size, (known or digest.hexdigest()) if size else ""
        if reply.accepted:
            self._audit.append("update_sent", job_id=h.job_id, task=h.task_name, round=h.round,
                               n_samples=n_samples, payload_sha256=digest_hex, payload_bytes=size_sent,
                               privacy=privacy or None,
                               **_reported(metrics, metrics_json))
            log.info("job %s %s round %d: result accepted (%d bytes, n_samples=%d); %s", h.job_id, h.task_name,
                     h.round, size_sent, n_samples, steps)
        else:
            self._audit.append("update_refused_by_server", job_id=h.job_id, round=h.round, reason=reply.reason)
            log.warning("job %s %s round %d: server refused our result: %s", h.job_id, h.task_name, h.round,
                        reply.reason)

    def _declines(self, job_id: str) -> bool:
        """Whether the site runs none of the job's tasks while this daemon runs: its own policy refused the
        whole job (org/role, code, the privacy floor under `refuse`), its DP budget (or the site's) has no room
        for another release, or the job filled its disk. Each holds until the site restarts (policies are
        read at start); the server then asks again. A refusal to build round 0 is of that task only."""
        return job_id in self._declined_jobs or job_id in self._disk_stopped

    async def _report_failure(self, h: pb.TaskHeader, reason: str, declines: bool = False) -> None:
        """Tell the server this site's task failed, and why: a result header with the error, no weights and
        no metrics (the server counts it as this site's failure of the round). Audited as what it is, an
        error report (`error_reported`, with the reason that left the site), never as an update sent.
        `declines`: the site will run none of this job while it runs (the server stops tasking it)."""
        header = pb.ResultHeader(session_id=self._session_id, task_id=h.task_id, metrics_json="{}", error=reason,
                                 declines_job=declines)

        async def chunks() -> AsyncIterator[bytes]:
            yield header_message(header)

        with call_errors("report failure", self._target):
            reply = await self._bulk.SubmitResult(chunks(), timeout=RPC_TIMEOUT_S)
        if reply.accepted:
            self._audit.append("error_reported", job_id=h.job_id, task=h.task_name, round=h.round, reason=reason,
                               **({"declines_job": True} if declines else {}))
            log.info("job %s %s round %d: the server took this site's failure report", h.job_id, h.task_name,
                     h.round)
        else:
            self._audit.append("error_report_refused_by_server", job_id=h.job_id, task=h.task_name, round=h.round,
                               reason=reply.reason)
            log.warning("job %s %s round %d: server refused this site's failure report: %s", h.job_id,
                        h.task_name, h.round, reply.reason)

    def _watch_disk(self, job_id: str, folders: JobFolders, worker: WorkerHandle) -> None:
        """The disk guard over the job's worker. The worker is killed and its folders emptied before anything
        is written: a job that filled the disk to its last byte left no room for the audit record, whose
        failure then stopped the whole site with the job's files still filling its disk."""
        def stop(reason: str) -> None:
            self._disk_stopped[job_id] = reason
            worker.kill()

        def stopped(reason: str) -> None:
            self._audit.append("job_stopped", job_id=job_id, rule="disk", reason=reason)

        self._disk_watch = asyncio.create_task(
            self._disk.watch(job_id, (folders.scratch, folders.outbox), stop, stopped), name="disk guard")

    async def _disk_cleaned(self, job_id: str) -> None:
        """Wait until the disk guard that stopped `job_id` has emptied its folders (the task it interrupted
        fails meanwhile, and its failure is written to the audit log only then)."""
        watch = self._disk_watch
        if watch is not None and job_id in self._disk_stopped:
            await asyncio.wait([watch], timeout=DISK_CLEANUP_WAIT_S)

    async def _stop_worker(self, job_id: str | None = None) -> None:
        """Stop the training worker (only job `job_id`'s, when given). It is let go before the await: a task
        of another job starting meanwhile starts its own worker, which this stop then never touches."""
        worker = self._worker
        if worker is None or (job_id is not None and worker.job_id != job_id):
            return
        self._worker = None
        if self._disk_watch is not None:
            if worker.job_id in self._disk_stopped:  # it fired and is emptying the job's folders: let it finish
                self._cleaning.add(self._disk_watch)
                self._disk_watch.add_done_callback(self._cleaning.discard)
            else:
                self._disk_watch.cancel()
            self._disk_watch = None
        await worker.stop()
        log.info("stopped the training worker of job %s", worker.job_id)


def _shaped_by_job(error: Exception) -> bool:
    """Whether the job's code could shape a failure's text (its exception, its exit code, the weights it
    wrote): under `reports: error_details: false` that stays on the site. The site's own limits (its task
    time cap, its memory limit) say only which limit stopped the job, in the site's words."""
    site_limit = isinstance(error, WorkerTimedOut | WorkerOutOfMemory)
    return isinstance(error, WorkerFailed | UpdateRejected) and not site_limit


def _decode_wire(path: Path) -> None:
    """runtime.quantize.decode_file, imported here (in a worker thread, off the event loop): NumPy and
    ml_dtypes are loaded only by the sites of a quantized job."""
    from .. import quantize

    quantize.decode_file(path)


def _encode_wire(path: Path, wire_dtype: str) -> tuple[Path, str, Any]:
    from .. import quantize

    return quantize.encode_file(path, wire_dtype)


def _read_hashed(f, digest) -> bytes:
    piece = f.read(CHUNK_BYTES)
    if digest is not None:
        digest.update(piece)
    return piece


def _decode_task_config(text: str) -> tuple[TaskConfig | None, str]:
    """The task's settings as this site reads them, or why it cannot (a server of another version)."""
    try:
        return TaskConfig.model_validate_json(text or "{}"), ""
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        return None, f"task settings from the server unreadable at '{where}': {first['msg']} (is this kit current?)"


def _round_folder(config: TaskConfig | None, round: int, task_name: str) -> str:
    """round_0003_train: the training workflow's rounds (and round 0) by number; the rounds of other
    workflows carry its name too (cross_site_round_0002_validate), so no two tasks of a job share one."""
    name = f"round_{round:04d}_{_safe_name(task_name)}"
    workflow = config.workflow if config else ""
    return name if workflow in TRAINING_WORKFLOWS or task_name == TaskKind.INIT else f"{_safe_name(workflow)}_{name}"


def _task_kind(name: str) -> TaskKind:
    try:
        return TaskKind(name)
    except ValueError:
        raise JobRejected(f"unknown task '{name[:40]}' (is this kit current?)") from None


LAST_GLOBAL_FILE = "last_global.safetensors"
SENT_SUFFIX = ".sent.safetensors"


def _site_places(kit: Path, data_root: str | None) -> dict[str, str]:
    """The site's own locations a failure message may name, each with the placeholder it leaves as: the kit
    (often a person's home folder) and the data folder (whose names may say whose data it is)."""
    places = {str(kit): "<kit>", str(kit.resolve()): "<kit>"}
    if data_root:
        root = Path(data_root).expanduser()
        places |= {str(root): "<data_root>", str(root.resolve()): "<data_root>"}
    return {location: name for location, name in places.items() if location != "/"}


def _site_paths_hidden(message: str, places: dict[str, str]) -> str:
    """A failure's message as it leaves the site: each of the site's locations (`_site_places`) becomes its
    placeholder, the longest first (a data folder inside the kit stays <data_root>); the site's log and
    audit keep the message whole. Best effort for honest messages: job code that wants a path out can
    encode it, which is what `reports: error_details: false` is for."""
    for location in sorted(places, key=len, reverse=True):
        # a whole path only: not /srv/kit-data for /srv/kit
        message = re.sub(re.escape(location) + r"(?![\w.-])", places[location], message)
    return message


def _local_figures(reply: dict[str, Any], config: TaskConfig) -> dict[str, float]:
    """The reply's `local` map as it may leave: only a site-side algorithm's own figures (steps, lr_sum), only
    when the task ran one. The job's code shares the worker's process, so it could fill the map at will."""
    if config.algorithm is None:
        return {}
    local = {k: v for k, v in (reply.get("local") or {}).items() if k in LOCAL_FIGURES}
    if "steps" in local and not (isinstance(local["steps"], int) or float(local["steps"]).is_integer()):
        del local["steps"]  # a count or nothing: 1234567.891011 carried the job's digits, not a count
    return local


def _keep_reference(received: Path, reference: Path) -> None:
    """Keep the global model just trained on past its round folder (a hard link: no copy), as the
    reference a later local model is filtered against."""
    tmp = reference.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.hardlink_to(received)
    except OSError:
        shutil.copyfile(received, tmp)
    tmp.replace(reference)


def _local_revocations(crl_path: Path, root_ca: Path) -> frozenset[int]:
    """Serials revoked by the study CRL site IT placed in local/ (none when there is no such file)."""
    if not crl_path.exists():
        return frozenset()
    return parse_crl(crl_path.read_bytes(), load_root_ca(root_ca), str(crl_path)).revoked


def _safe_name(text: str) -> str:
    """A server-given id used as a folder name: no path tricks, no control characters (a NUL byte made
    mkdir raise ValueError, which stopped the site), no name too long for a file system."""
    if (not text or "/" in text or "\\" in text or text.startswith(".") or len(text) > MAX_ID_CHARS
            or any(not ch.isprintable() for ch in text)):
        raise JobRejected(f"invalid id {shown(text[:40])!r} from the server")
    return text


NO_LOG = "this site keeps its log to itself (local/site.yml send_log: false); ask its IT for workspace/log.txt"


def _reported(metrics: dict[str, Any], metrics_json: str) -> dict[str, Any]:
    """What of a result beside its weights the site's audit keeps, so site IT can answer "what did we
    report?" from its own records: every metric that left, as it left (after `reports:`), the number of
    scalar points, and the sha256 of the exact metrics text sent (scalars included)."""
    reported = {k: v for k, v in metrics.items() if k not in ("privacy", "scalars")}
    if metrics.get("scalars"):
        reported["scalar_points"] = len(metrics["scalars"])
    return {"reported": reported, "metrics_sha256": sha256_hex(metrics_json.encode())}


def _read_steps(path: Path) -> dict[str, int]:
    """A job's scalar_steps.json (the daemon's own file, beside the job's folders): name -> last step."""
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}
    except (OSError, ValueError, AttributeError):
        return {}


class HeldElsewhere(FedkitError):
    """The server refused to register this site: another process of its kit is connected."""


@contextlib.contextmanager
def _held_elsewhere() -> Iterator[None]:
    try:
        yield
    except PermissionDenied as e:  # at registration, the one refusal a site's own certificate can get
        raise HeldElsewhere(str(e)) from None


class Outage:
    """The server unreachable (or refusing this site's certificate), in the site's log: the first failed try
    in full, then one line a minute (a weekend's outage logged every retry was 25,000 lines), and one when it
    is back."""

    EVERY_S = 60.0

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._since: float | None = None
        self._last_logged = 0.0
        self._tries = 0

    def failed(self, line: str, level: int = logging.WARNING) -> None:
        now = self._clock()
        self._tries += 1
        if self._since is None:
            self._since, self._last_logged = now, now
            log.log(level, "%s", line)
        elif now - self._last_logged >= self.EVERY_S:
            self._last_logged = now
            log.log(level, "%s (still, for %.0f s, %d tries)", line, now - self._since, self._tries)

    def ended(self) -> None:
        if self._since is not None and self._tries > 1:
            log.info("server reachable again after %.0f s (%d tries)", self._clock() - self._since, self._tries)
        self._since, self._tries = None, 0


def _log_tail(path: Path, max_bytes: int = 64 << 10) -> str:
    """The end of this site's log, for an admin's tail_log (never more than `max_bytes`)."""
    data, cut = log_tail_bytes(path, max_bytes)
    text = data.decode(errors="replace")
    if cut:
        text = text.partition("\n")[2]  # drop the line the cut went through
    return text or "(empty log)"


