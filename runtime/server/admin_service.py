"""The Admin service's behaviour, free of gRPC: every console command, authorized by the role in the
admin's certificate and written to the audit trail (allowed or denied, and how it ended).

Audit first, then act: a command that changes state or lets data out (STATE_CHANGING) gets an
`admin_request` record before anything is done for it, even before its authorization check, and the
command is refused if that record cannot be written; every command, read-only ones included, then gets
an `admin_command` record with its outcome. (Read-only commands get only the outcome record: they have
no effect a crash could hide, and wait_job polls; a successful read asked again by the same admin with
the same arguments is recorded once a minute (local/server.yml `audit_repeated_reads_s`) with the count
of its repeats, see repeated_reads.py: a dashboard polls every second.) Whatever a request carries is
bounded before it is recorded or echoed (audit_args.py), and a request whose arguments exceed
MAX_REQUEST_ARGS_BYTES is refused unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..errors import FedkitError, PermissionDenied
from ..identity import Identity
from ..procs import log_files, log_tail_bytes
from ..proto import fedkit_pb2 as pb
from ..transport import CHUNK_BYTES
from .audit_args import bounded_args, bounded_text
from .authz import Policy
from .cross_site_report import report_view
from .initial_model_upload import announced, spool_both
from .job_store import FINAL_STATES, JobRecord, JobState
from .registry import Registry
from .repeated_reads import REPEAT_AFTER_S, RepeatedReads, read_key
from .runner import JobRunner
from .site_controls import SiteControls
from .tracker import draw_curves, latest_scalars
from .upload_spool import spool

METRICS_VIEW_BYTES = 2 << 20  # the metric entries a show_job or wait_job reply carries, newest first

log = logging.getLogger(__name__)

SITE_LOG_TIMEOUT_S = 20.0  # a few heartbeats

MAX_UPLOAD_BYTES = 256 << 20
MAX_WAIT_S = 20.0  # a wait_job call returns by then at the latest (the console's call timeout is 30 s)
WAIT_POLL_S = 0.5

# commands allowed whenever another one is: wait_job is show_job, asked again until something changes
_PERMISSION_OF = {"wait_job": "show_job"}
# audited before they act (see the module docstring)
STATE_CHANGING = frozenset({"abort_job", "clone_job", "delete_job", "submit_job", "download_job",
                            "shutdown_client", "restart_client", "shutdown_server"})
MAX_REQUEST_ARGS_BYTES = 64 << 10  # a console sends a few hundred bytes; overrides are the largest part
MAX_REPLY_MESSAGE_CHARS = 1000
MAX_REPLY_BYTES = 3 << 20  # under gRPC's 4 MB message limit, with room for the envelope
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Handler = Callable[[Identity, dict[str, Any]], Awaitable[Any]]


class CommandError(FedkitError):
    """An admin command that cannot be carried out as asked (unknown command, site or argument)."""


class AdminService:
    def __init__(self, runner: JobRunner, registry: Registry, policy: Policy, audit: AuditLog,
                 server_org: str, log_path: Path, controls: SiteControls, on_shutdown: Callable[[], None],
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_initial_model_bytes: int = 64 << 30,
                 repeated_reads_s: float = REPEAT_AFTER_S):
        self._runner = runner
        self._max_upload_bytes = max_upload_bytes
        self._max_initial_model_bytes = max_initial_model_bytes
        self._registry = registry
        self._policy = policy
        self._audit = audit
        self._server_org = server_org
        self._log_path = log_path
        self._controls = controls  # delivered with each site's next heartbeat
        self._on_shutdown = on_shutdown
        self._repeated_reads = RepeatedReads(time.monotonic, repeated_reads_s)
        self._started_at = time.time()
        self._commands: dict[str, Handler] = {
            "help": self._help, "check_status": self._check_status, "list_jobs": self._list_jobs,
            "show_job": self._show_job, "wait_job": self._wait_job, "abort_job": self._abort_job,
            "clone_job": self._clone_job, "delete_job": self._delete_job, "show_audit": self._show_audit,
            "sys_info": self._sys_info, "tail_log": self._tail_log, "shutdown_client": self._shutdown_client,
            "restart_client": self._restart_client, "shutdown_server": self._shutdown_server,
        }
        # what a policy may name: every command's permission (submit and download come as their own RPCs)
        policy.check_commands({_PERMISSION_OF.get(c, c) for c in self._commands} | {"submit_job", "download_job"})

    # ---- RPC entry points ------------------------------------------------------------------------

    async def command(self, peer: Identity, request: pb.AdminRequest) -> pb.AdminReply:
        """Run one command. The role's right to the command is checked before any lookup, so a denied
        admin learns nothing about the target (not even whether a job exists) and is audited as denied."""
        name, args = _printable(bounded_text(request.command, 64)), {}  # it goes into the log and the trail
        try:
            args = _decode_args(request.args_json)
            handler = self._commands.get(name)
            if handler is None:
                raise CommandError(f"unknown command '{name}' (try 'help')")
            if name != "help":  # a denied role does nothing, so it needs no request record, only its denial's
                self._policy.scope(peer, _PERMISSION_OF.get(name, name))
            if name in STATE_CHANGING:
                self._check_target(peer, name, args)  # another's job, another org's site: denied, not requested
                await self._record_request(peer, name, args)
            data = await handler(peer, args)
        except FedkitError as e:
            denied = isinstance(e, PermissionDenied) or name not in self._commands
            return await self._refused(peer, name, args, e, allowed=not denied)
        except Exception as e:  # a bug: the admin gets one line, the audit trail its record, the log the trace
            log.exception("admin command %s from %s failed", name, peer.name)
            return await self._refused(peer, name, args, e, allowed=True)
        await self._record(peer, name, {**args, **_made(name, data)}, allowed=True)
        return pb.AdminReply(ok=True, data_json=json.dumps(data, default=str))

    async def _refused(self, peer: Identity, name: str, args: dict[str, Any], err: Exception,
                       allowed: bool) -> pb.AdminReply:
        """Audit a command that failed and answer the admin in one bounded line."""
        message = str(err) if isinstance(err, FedkitError) else "internal server error (see the server log)"
        message = bounded_text(" ".join(message.split()), MAX_REPLY_MESSAGE_CHARS)
        with contextlib.suppress(OSError):  # the audit log itself failing: the admin still gets an answer
            await self._record(peer, name, args, allowed=allowed, error=message,  # made-up names: one key
                               denial_key="" if name in self._commands else "an unknown command")
        return pb.AdminReply(ok=False, message=message)

    async def upload(self, peer: Identity, chunks: AsyncIterator[pb.UploadChunk]) -> pb.AdminReply:
        """submit_job: audited first, authorized and quota-checked before the archive is read, which then
        streams to a file in the job store (never held in memory) and is validated from there."""
        args: dict[str, Any] = {}
        spooled = model = None
        try:
            first = await anext(chunks, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise CommandError("upload must start with a header")
            args = _decode_args(first.header.args_json)
            await self._record_request(peer, "submit_job", args)
            self._policy.check(peer, "submit_job")  # before reading the archive
            overrides = _overrides(args)
            await asyncio.to_thread(self._runner.check_quota, peer)
            big = announced(args, self._max_upload_bytes, self._max_initial_model_bytes)
            if big is None:
                spooled = await spool(_upload_data(chunks), self._runner.store.incoming_dir, self._max_upload_bytes)
            else:  # the archive, then a large initial model streamed beside it (initial_model_upload.py)
                spooled, model = await spool_both(_upload_data(chunks), big, self._runner.store.incoming_dir)
            record = await self._runner.submit(peer, spooled.path, overrides, spooled.sha256,
                                               args.get("code_signature"), model.path if model else None)
        except FedkitError as e:
            return await self._refused(peer, "submit_job", args, e, allowed=not isinstance(e, PermissionDenied))
        except Exception as e:
            log.exception("submit_job from %s failed", peer.name)
            return await self._refused(peer, "submit_job", args, e, allowed=True)
        finally:
            for part in (spooled, model):
                if part is not None:
                    part.path.unlink(missing_ok=True)  # moved into the job's folder when accepted
        await self._record(peer, "submit_job", {**args, "job_id": record.job_id, "job_sha256": record.job_sha256,
                                                "code_sha256": record.code_sha256}, allowed=True)
        reply = {**asdict(record), "waiting_for": await self._runner.waiting_for(record),
                 "unknown_sites": await self._runner.unknown_sites(record)}
        return pb.AdminReply(ok=True, message=f"submitted job {record.job_id}", data_json=json.dumps(reply))

    async def download(self, peer: Identity, request: pb.AdminRequest) -> AsyncIterator[pb.DataChunk]:
        args: dict[str, Any] = {}
        try:
            args = _decode_args(request.args_json)
            await self._record_request(peer, "download_job", args)
            self._policy.scope(peer, "download_job")  # before the lookup, as for every command
            record = self._runner.store.load(_job_id(args))
            self._policy.check(peer, "download_job", **_job_target(record))
        except FedkitError as e:
            reply = await self._refused(peer, "download_job", args, e, allowed=not isinstance(e, PermissionDenied))
            raise type(e)(reply.message) from None
        await self._record(peer, "download_job", args, allowed=True)
        await asyncio.to_thread(self._draw_curves, record.job_id)
        path = await asyncio.to_thread(self._zip_job, record.job_id)
        try:
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                    yield pb.DataChunk(data=chunk)
        finally:
            path.unlink(missing_ok=True)

    # ---- commands --------------------------------------------------------------------------------

    async def _help(self, peer: Identity, args: dict[str, Any]) -> Any:
        allowed = []
        for name in sorted([*self._commands, "submit_job", "download_job"]):
            try:
                self._policy.scope(peer, _PERMISSION_OF.get(name, name))
                allowed.append(name)
            except PermissionDenied:
                pass
        return {"commands": allowed, "role": peer.role, "admin": peer.name, "org": peer.org}

    async def _check_status(self, peer: Identity, args: dict[str, Any]) -> Any:
        wanted = [str(s) for s in args.get("sites") or []]
        unknown = [s for s in wanted if self._registry.session(s) is None]
        if unknown:
            raise CommandError(f"no site {', '.join(repr(s) for s in unknown)} has connected since the server "
                               "started")
        sites = [self._site_status(s.name) for s in self._registry.sessions()
                 if (not wanted or s.name in wanted) and self._policy.allows(peer, "check_status", target_org=s.org)]
        return {"server": await asyncio.to_thread(self._server_status), "sites": sites}

    def _server_status(self) -> dict[str, Any]:
        current = self._runner.current
        plan = current.current_plan if current else None
        return {"running_job": current.record.job_id if current else None,
                "running_job_name": current.record.name if current else None,
                "round": current.current_round if current else None,
                "rounds_total": current.record.rounds_total if current else None,
                # a round's number counts within its workflow: rounds_total is for the train task only
                "task": plan.kind.value if plan else None, "task_label": plan.label if plan else None,
                "queued": self._runner.queued(), "uptime_s": round(time.time() - self._started_at, 1),
                "sites_online": len(self._registry.alive())}

    def _site_status(self, site: str) -> dict[str, Any]:
        s = self._registry.session(site)
        assert s is not None
        state, job_id, rnd = self._registry.state(s.name), s.job_id, s.round
        current = self._runner.current
        if job_id and (current is None or current.record.job_id != job_id) and state.startswith("round "):
            # its last heartbeat (up to one interval old) names a job that has ended here since
            state, job_id, rnd = "idle", "", 0
        if state == "idle" and current is not None:  # why it has nothing to do while a job runs
            state = current.idle_site_state(s.name) or state
        return {"site": s.name, "org": s.org, "online": self._registry.is_alive(s.name), "state": state,
                "last_heartbeat_s_ago": round(self._registry.seconds_since_seen(s.name) or 0.0, 1),
                "job_id": job_id, "round": rnd}

    async def _list_jobs(self, peer: Identity, args: dict[str, Any]) -> Any:
        """Every job the admin may see: all of them by default, fewer under an own_jobs/own_org policy."""
        records = await asyncio.to_thread(self._runner.store.all)
        return [asdict(r) for r in records if self._policy.allows(peer, "list_jobs", **_job_target(r))]

    async def _show_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        return await self._job_view(peer, _job_id(args))

    async def _job_view(self, peer: Identity, job_id: str, since: int = 0) -> dict[str, Any]:
        """A job's record and per-round metrics (the newest that fit a reply, from entry `since` on), with
        where it stands in the queue and its output size."""
        record = await asyncio.to_thread(self._runner.store.load, job_id)
        self._policy.check(peer, "show_job", **_job_target(record))
        details = await asyncio.to_thread(self._job_details, record, since)
        return {**details, "waiting_for": await self._runner.waiting_for(record)}  # why a queued job waits

    def _job_details(self, record: JobRecord, since: int = 0) -> dict[str, Any]:
        queued = self._runner.queued()
        entries = self._runner.store.metrics(record.job_id)
        first = _first_shown(entries, since, METRICS_VIEW_BYTES)
        return {"record": asdict(record), "metrics": entries[first:], "metrics_total": len(entries),
                "metrics_skipped": first,
                "queue_position": queued.index(record.job_id) + 1 if record.job_id in queued else None,
                "output_bytes": self._runner.store.output_bytes(record.job_id),
                "cross_site": report_view(self._runner.store.job_dir(record.job_id)),  # None until a report exists
                "scalars": latest_scalars(self._runner.store.job_dir(record.job_id))}  # learners' log_scalar, last

    async def _wait_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        """show_job once the job has more metric entries than the console has seen, or has ended, or
        MAX_WAIT_S passed: one audit record per change (or per MAX_WAIT_S) instead of one per second."""
        job_id = _job_id(args)
        seen = int(_number_arg(args, "seen_metrics", 0, 0, 1e9))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _number_arg(args, "wait_s", MAX_WAIT_S, 0, MAX_WAIT_S)
        while True:
            view = await self._job_view(peer, job_id, since=seen)
            if view["metrics_total"] > seen or view["record"]["state"] in FINAL_STATES or loop.time() >= deadline:
                return view
            await asyncio.sleep(WAIT_POLL_S)

    async def _abort_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "abort_job", **_job_target(record))
        result = asdict(self._runner.abort(record.job_id))
        if result["state"] == JobState.RUNNING:
            result["state"] = "aborting"  # the controller stops at its next check; show_job tells when
        return result

    async def _clone_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "clone_job", **_job_target(record))
        self._policy.check(peer, "submit_job")
        copy = await asyncio.to_thread(self._copy_archive, record.job_id)
        try:
            signature = await asyncio.to_thread(self._runner.store.code_signature, record.job_id)
            clone = await self._runner.submit(peer, copy, record.overrides, record.job_sha256, signature)
        finally:
            copy.unlink(missing_ok=True)
        return {**asdict(clone), "cloned_from": record.job_id, "waiting_for": await self._runner.waiting_for(clone)}

    def _copy_archive(self, job_id: str) -> Path:
        """A copy of a job's archive in the incoming folder, as an upload would be."""
        fd, name = tempfile.mkstemp(suffix=".clone", dir=self._runner.store.incoming_dir)
        os.close(fd)
        shutil.copyfile(self._runner.store.job_dir(job_id) / "job.zip", name)
        return Path(name)

    async def _delete_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "delete_job", **_job_target(record))
        await self._runner.delete(record.job_id)
        return {"deleted": record.job_id, "state": "deleted"}

    async def _show_audit(self, peer: Identity, args: dict[str, Any]) -> Any:
        """The last N records, as many of the newest as fit in one reply (gRPC refuses a message over 4 MB:
        2000 records of large arguments did not fit, and the dashboard's audit page failed)."""
        records = await asyncio.to_thread(self._audit.tail, _int_arg(args, "n", 20))
        size, keep = 0, 0
        for record in reversed(records):
            size += len(json.dumps(record, default=str)) + 2
            if size > MAX_REPLY_BYTES:
                break
            keep += 1
        return records[len(records) - keep:]

    def _site_org(self, site: str) -> str:
        if site == "server":
            return self._server_org
        session = self._registry.session(site)
        if session is None:
            raise CommandError(f"no site '{site}' has connected since the server started")
        return session.org

    async def _sys_info(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", "server"))
        self._policy.check(peer, "sys_info", target_org=self._site_org(site))
        if site == "server":
            return await asyncio.to_thread(self._server_info)
        session = self._registry.session(site)
        assert session is not None
        return {**self._site_status(site), **session.host_info}

    def _server_info(self) -> dict[str, Any]:
        disk = shutil.disk_usage(self._log_path.parent)
        return {"site": "server", "org": self._server_org, "hostname": platform.node(), "pid": os.getpid(),
                "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "load": os.getloadavg(), "uptime_s": round(time.time() - self._started_at, 1),
                "workspace_free_bytes": disk.free}

    async def _tail_log(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", "server"))
        n = _int_arg(args, "n", 50)
        self._policy.check(peer, "tail_log", target_org=self._site_org(site))
        if site == "server":
            lines = await asyncio.to_thread(_tail, self._log_path, n)
            return {"site": "server", "lines": lines}
        if not self._registry.is_alive(site):
            raise CommandError(f"tail_log {site}: the site is offline; read workspace/log.txt in its kit")
        text = await self._controls.request_log(site, SITE_LOG_TIMEOUT_S)
        if text is None:
            raise CommandError(f"tail_log {site}: the site did not send its log within {SITE_LOG_TIMEOUT_S:g} s")
        return {"site": site, "lines": text.splitlines()[-n:]}

    async def _shutdown_client(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", ""))
        self._policy.check(peer, "shutdown_client", target_org=self._site_org(site))
        self._check_connected(site, "shutdown")
        self._controls.queue(site, "shutdown")
        return {"site": site, "control": "shutdown", "note": "delivered with the site's next heartbeat"}

    async def _restart_client(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", ""))
        self._policy.check(peer, "restart_client", target_org=self._site_org(site))
        self._check_connected(site, "restart")
        self._controls.queue(site, "restart")
        return {"site": site, "control": "restart", "note": "delivered with the site's next heartbeat"}

    async def _shutdown_server(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "shutdown_server", target_org=self._server_org)
        asyncio.get_running_loop().call_later(0.5, self._on_shutdown)
        return {"server": "shutting down"}

    def record_pending_repeats(self) -> None:
        """At stop: one record per read or denial repeated since its last record, with the count, so the trail
        does not lose them (they were written only with the next record of the same key)."""
        for key, repeats in self._repeated_reads.take_pending():
            if key[0] in ("denied", "burst"):  # counted whatever their arguments
                kind, admin, command = key
                fields = {"admin": admin, "command": command, "allowed": kind == "burst"}
            else:
                admin, command, args = key
                fields = {"admin": admin, "command": command, "args": json.loads(args), "allowed": True}
            self._audit.append("admin_command_repeats", **fields, repeats_since_last=repeats)

    # ---- helpers ---------------------------------------------------------------------------------

    def _check_target(self, peer: Identity, name: str, args: dict[str, Any]) -> None:
        """The own_jobs / own_org check of a state-changing command, before its request record: a lead
        aborting others' jobs in a loop wrote one request record per call (the handler checks again)."""
        if name in ("abort_job", "clone_job", "delete_job"):
            self._policy.check(peer, name, **_job_target(self._runner.store.load(_job_id(args))))
        elif name in ("shutdown_client", "restart_client"):
            self._policy.check(peer, name, target_org=self._site_org(str(args.get("site", ""))))

    def _check_connected(self, site: str, word: str) -> None:
        """A control word reaches a site with its next heartbeat: refuse one for a site that sends none."""
        if site not in self._registry.alive():
            raise CommandError(f"site '{site}' is {self._registry.state(site)}: a {word} reaches only a connected "
                               "site (with its next heartbeat); nothing was queued")

    async def _record_request(self, peer: Identity, command: str, args: dict[str, Any]) -> None:
        """The record written before a state-changing command acts; if it cannot be written, nothing is done."""
        try:
            await asyncio.to_thread(self._audit.append, "admin_request", admin=peer.name, org=peer.org,
                                    role=peer.role.value if peer.role else "", command=command,
                                    args=bounded_args(args))
        except OSError as e:
            log.error("audit log unwritable, %s from %s refused: %s", command, peer.name, e)
            raise CommandError(f"{command}: the server cannot write its audit log, so nothing was done; "
                               "tell the server's site IT") from None

    async def _record(self, peer: Identity, command: str, args: dict[str, Any], allowed: bool, error: str = "",
                      denial_key: str = "") -> None:
        """Audit one command's outcome; off the event loop, because each record is fsynced. Denials are counted
        per admin and `denial_key` (default: the command)."""
        bounded, repeats = bounded_args(args), 0
        reads = self._repeated_reads
        if allowed and not error and command not in STATE_CHANGING:
            repeats = reads.due(read_key(peer.name, command, bounded))
        elif not allowed:  # the first denial at once; a flood of them (any arguments) once an interval, counted
            repeats = reads.due(("denied", peer.name, denial_key or command))
        if repeats is None:
            return  # counted; written with the next record of the same read or denial
        if allowed and command not in STATE_CHANGING and reads.over_budget(peer.name, command):
            repeats = reads.due(("burst", peer.name, command))  # a read or failed read past its budget
            if repeats is None:
                return
        await asyncio.to_thread(self._audit.append, "admin_command", admin=peer.name, org=peer.org,
                                role=peer.role.value if peer.role else "", command=command, args=bounded,
                                allowed=allowed, result="error" if error else "ok", error=bounded_text(error, 500),
                                **({"repeats_since_last": repeats} if repeats else {}))
        if not allowed:
            log.warning("denied %s (%s, %s): %s%s", peer.name, peer.role, command, _printable(error),
                        f" ({repeats} more since the last record)" if repeats else "")

    def _zip_job(self, job_id: str) -> Path:
        """The job's folder, plus the server log lines that name it, as one zip in the workspace (not
        /tmp, which may be too small for the models)."""
        job_dir = self._runner.store.job_dir(job_id)
        fd, name = tempfile.mkstemp(suffix=".download.zip", dir=self._log_path.parent)
        os.close(fd)
        with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as zf:  # models barely compress
            for path in self._runner.store.output_files(job_id):
                if path.is_file():
                    zf.write(path, path.relative_to(job_dir).as_posix())
            zf.writestr("server_log.txt", "".join(_lines_naming(self._log_path, job_id)))
        return Path(name)

    def _draw_curves(self, job_id: str) -> None:
        """The learning curves, drawn here (never by the job's rounds) when its metrics changed since the
        last drawing (tracker.draw_curves)."""
        try:
            key_metric = self._runner.spec(job_id).server.key_metric.name
        except (OSError, ValueError):  # no readable spec: the panels come in name order
            key_metric = ""
        draw_curves(self._runner.store.job_dir(job_id), key_metric)


def _decode_args(text: str) -> dict[str, Any]:
    if len(text) > MAX_REQUEST_ARGS_BYTES:
        raise CommandError(f"command arguments are {len(text)} bytes (limit {MAX_REQUEST_ARGS_BYTES}); "
                           "send less")
    try:
        args = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise CommandError("command arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise CommandError("command arguments must be a JSON object")
    return args


def _job_id(args: dict[str, Any]) -> str:
    job_id = str(args.get("job_id", ""))
    if not job_id:
        raise CommandError("missing job id")
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise CommandError(f"job id {bounded_text(job_id, 40)!r} is malformed: job ids look like "
                           "20260101-120000-a1b2c3 (list_jobs shows them)")
    return job_id


def _overrides(args: dict[str, Any]) -> list[str]:
    overrides = args.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise CommandError("'overrides' must be a list of KEY=VALUE strings")
    return overrides


async def _upload_data(chunks: AsyncIterator[pb.UploadChunk]) -> AsyncIterator[bytes]:
    """The archive's bytes: every message after the header must be data."""
    async for chunk in chunks:
        if chunk.WhichOneof("kind") != "data":
            raise CommandError("upload: only data may follow the header")
        yield chunk.data


def _int_arg(args: dict[str, Any], name: str, default: int, most: int = 10_000) -> int:
    """A count argument, 1 to `most`."""
    return int(_number_arg(args, name, default, 1, most))


def _number_arg(args: dict[str, Any], name: str, default: float, least: float, most: float) -> float:
    try:
        value = float(args.get(name, default))
    except (TypeError, ValueError):
        raise CommandError(f"'{name}' must be a number, not {args.get(name)!r}") from None
    if not least <= value <= most:
        raise CommandError(f"'{name}' must be between {least:g} and {most:g}, not {value:g}")
    return value


def _job_target(record: JobRecord) -> dict[str, str]:
    """What an own_jobs or own_org rule compares for a job: its submitter, and the submitter's org."""
    return {"job_submitter": record.submitter, "target_org": record.submitter_org}


def _first_shown(entries: list[dict[str, Any]], since: int, budget_bytes: int) -> int:
    """The index of the first entry a view carries: the newest from `since` on whose JSON fits `budget_bytes`
    (a reply is one gRPC message: a 3000-round job's 7 MB of metrics made show_job, wait_job and
    download_job fail; download_job's metrics.jsonl holds them all)."""
    first, used = len(entries), 0
    while first > min(since, len(entries)):
        size = len(json.dumps(entries[first - 1]))
        if used + size > budget_bytes:
            break
        used += size
        first -= 1
    return first


def _lines_naming(path: Path, text: str) -> list[str]:
    """The lines naming `text` in the log and its rotated files (a long job's first lines rotate out)."""
    lines = []
    for part in log_files(path):
        with part.open(errors="replace") as f:
            lines += [line for line in f if text in line]
    return lines


def _tail(path: Path, n: int) -> list[str]:
    """The last `n` lines of the log (of its last 256 KiB, rotated files included)."""
    data, _ = log_tail_bytes(path, 256 * 1024)
    return [ln.decode(errors="replace") for ln in data.splitlines()[-n:]]


def _printable(text: str) -> str:
    """`text` with line breaks and other control characters escaped: a command name or a reason sent by an
    admin's own script must not forge lines in the server's log (which holds the audit anchors)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


def _made(command: str, data: Any) -> dict[str, Any]:
    """What a command created, for its audit record: a clone's new job and its hashes, as submit_job records
    its own (the clone's record named only the job it copied)."""
    if command != "clone_job" or not isinstance(data, dict):
        return {}
    return {"new_job_id": data.get("job_id"), "job_sha256": data.get("job_sha256"),
            "code_sha256": data.get("code_sha256")}
