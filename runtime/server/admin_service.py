"""The Admin service's behaviour, free of gRPC: every console command, authorized by the role in the
admin's certificate and written to the audit trail (allowed or denied, and how it ended)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..errors import FedkitError, JobRejected, PermissionDenied
from ..identity import Identity
from ..proto import fedkit_pb2 as pb
from ..transport import CHUNK_BYTES
from .authz import Policy
from .job_store import FINAL_STATES, JobState
from .registry import Registry
from .runner import JobRunner

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 256 << 20

Handler = Callable[[Identity, dict[str, Any]], Awaitable[Any]]


class AdminService:
    def __init__(self, runner: JobRunner, registry: Registry, policy: Policy, audit: AuditLog,
                 server_org: str, log_path: Path, controls: dict[str, str], on_shutdown: Callable[[], None]):
        self._runner = runner
        self._registry = registry
        self._policy = policy
        self._audit = audit
        self._server_org = server_org
        self._log_path = log_path
        self._controls = controls  # site -> pending control word, delivered with its next heartbeat
        self._on_shutdown = on_shutdown
        self._commands: dict[str, Handler] = {
            "help": self._help, "check_status": self._check_status, "list_jobs": self._list_jobs,
            "show_job": self._show_job, "abort_job": self._abort_job, "clone_job": self._clone_job,
            "delete_job": self._delete_job, "show_audit": self._show_audit, "sys_info": self._sys_info,
            "tail_log": self._tail_log, "shutdown_client": self._shutdown_client,
            "restart_client": self._restart_client, "shutdown_server": self._shutdown_server,
        }

    # ---- RPC entry points ------------------------------------------------------------------------

    async def command(self, peer: Identity, request: pb.AdminRequest) -> pb.AdminReply:
        args = _decode_args(request.args_json)
        handler = self._commands.get(request.command)
        if handler is None:
            return pb.AdminReply(ok=False, message=f"unknown command '{request.command}' (try 'help')")
        try:
            data = await handler(peer, args)
        except FedkitError as e:
            self._record(peer, request.command, args, allowed=not isinstance(e, PermissionDenied), error=str(e))
            return pb.AdminReply(ok=False, message=str(e))
        self._record(peer, request.command, args, allowed=True)
        return pb.AdminReply(ok=True, data_json=json.dumps(data, default=str))

    async def upload(self, peer: Identity, chunks: AsyncIterator[pb.UploadChunk]) -> pb.AdminReply:
        first = await anext(chunks, None)
        if first is None or first.WhichOneof("kind") != "header":
            return pb.AdminReply(ok=False, message="upload must start with a header")
        args = _decode_args(first.header.args_json)
        try:
            self._policy.check(peer, "submit_job")
            parts, size = [], 0
            async for chunk in chunks:
                size += len(chunk.data)
                if size > MAX_UPLOAD_BYTES:
                    raise JobRejected(f"job archive larger than {MAX_UPLOAD_BYTES} bytes")
                parts.append(chunk.data)
            overrides = [str(o) for o in args.get("overrides", [])]
            record = await asyncio.to_thread(self._runner.submit, peer, b"".join(parts), overrides)
        except FedkitError as e:
            self._record(peer, "submit_job", args, allowed=not isinstance(e, PermissionDenied), error=str(e))
            return pb.AdminReply(ok=False, message=str(e))
        self._record(peer, "submit_job", {**args, "job_id": record.job_id, "job_sha256": record.job_sha256},
                     allowed=True)
        return pb.AdminReply(ok=True, message=f"submitted job {record.job_id}", data_json=json.dumps(asdict(record)))

    async def download(self, peer: Identity, request: pb.AdminRequest) -> AsyncIterator[pb.DataChunk]:
        args = _decode_args(request.args_json)
        job_id = str(args.get("job_id", ""))
        try:
            record = self._runner.store.load(job_id)
            self._policy.check(peer, "download_job", job_submitter=record.submitter)
        except FedkitError as e:
            self._record(peer, "download_job", args, allowed=not isinstance(e, PermissionDenied), error=str(e))
            raise
        self._record(peer, "download_job", args, allowed=True)
        path = await asyncio.to_thread(self._zip_job, job_id)
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
                self._policy.scope(peer, name)
                allowed.append(name)
            except PermissionDenied:
                pass
        return {"commands": allowed, "role": peer.role}

    async def _check_status(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "check_status")
        now = time.time()
        current = self._runner.current
        wanted = set(args.get("sites") or [])
        sites = [{"site": s.name, "org": s.org, "online": self._registry.is_alive(s.name),
                  "last_heartbeat_s_ago": round(now - s.last_seen, 1), "job_id": s.job_id, "round": s.round}
                 for s in self._registry.sessions() if not wanted or s.name in wanted]
        return {"server": {"running_job": current.record.job_id if current else None,
                           "round": current.current_round if current else None,
                           "queued": [r.job_id for r in self._runner.store.all() if r.state is JobState.QUEUED]},
                "sites": sites}

    async def _list_jobs(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "list_jobs")
        return [asdict(r) for r in await asyncio.to_thread(self._runner.store.all)]

    async def _show_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "show_job")
        job_id = _job_id(args)
        record = self._runner.store.load(job_id)
        return {"record": asdict(record), "metrics": self._runner.store.metrics(job_id)}

    async def _abort_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "abort_job", job_submitter=record.submitter)
        return asdict(self._runner.abort(record.job_id))

    async def _clone_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "clone_job", job_submitter=record.submitter)
        self._policy.check(peer, "submit_job")
        archive = self._runner.store.archive(record.job_id)
        clone = self._runner.submit(peer, archive, record.overrides)
        return asdict(clone)

    async def _delete_job(self, peer: Identity, args: dict[str, Any]) -> Any:
        record = self._runner.store.load(_job_id(args))
        self._policy.check(peer, "delete_job", job_submitter=record.submitter)
        if record.state not in FINAL_STATES and record.state is not JobState.QUEUED:
            raise JobRejected(f"job {record.job_id} is {record.state.value}; abort it first")
        await asyncio.to_thread(self._runner.store.delete, record.job_id)
        return {"deleted": record.job_id}

    async def _show_audit(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "show_audit")
        return self._audit.tail(int(args.get("n", 20)))

    def _site_org(self, site: str) -> str:
        if site == "server":
            return self._server_org
        session = self._registry.session(site)
        if session is None:
            raise JobRejected(f"no site '{site}' has connected")
        return session.org

    async def _sys_info(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", "server"))
        self._policy.check(peer, "sys_info", target_org=self._site_org(site))
        if site == "server":
            return {"pid": os.getpid(), "cpus": os.cpu_count(), "load": os.getloadavg()}
        session = self._registry.session(site)
        return {"site": site, "org": session.org if session else "", **(session.host_info if session else {})}

    async def _tail_log(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", "server"))
        n = int(args.get("n", 50))
        self._policy.check(peer, "tail_log", target_org=self._site_org(site))
        if site == "server":
            lines = await asyncio.to_thread(_tail, self._log_path, n)
            return {"site": "server", "lines": lines}
        raise JobRejected("tail_log for a site is not supported yet: read the site's workspace/log.txt there")

    async def _shutdown_client(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", ""))
        self._policy.check(peer, "shutdown_client", target_org=self._site_org(site))
        self._controls[site] = "shutdown"
        return {"site": site, "control": "shutdown", "note": "delivered with the site's next heartbeat"}

    async def _restart_client(self, peer: Identity, args: dict[str, Any]) -> Any:
        site = str(args.get("site", ""))
        self._policy.check(peer, "restart_client", target_org=self._site_org(site))
        self._controls[site] = "restart"
        return {"site": site, "control": "restart", "note": "delivered with the site's next heartbeat"}

    async def _shutdown_server(self, peer: Identity, args: dict[str, Any]) -> Any:
        self._policy.check(peer, "shutdown_server", target_org=self._server_org)
        asyncio.get_running_loop().call_later(0.5, self._on_shutdown)
        return {"server": "shutting down"}

    # ---- helpers ---------------------------------------------------------------------------------

    def _record(self, peer: Identity, command: str, args: dict[str, Any], allowed: bool, error: str = "") -> None:
        self._audit.append("admin_command", admin=peer.name, org=peer.org,
                           role=peer.role.value if peer.role else "", command=command, args=args,
                           allowed=allowed, result="error" if error else "ok", error=error)
        if not allowed:
            log.warning("denied %s (%s, %s): %s", peer.name, peer.role, command, error)

    def _zip_job(self, job_id: str) -> Path:
        job_dir = self._runner.store.job_dir(job_id)
        fd, name = tempfile.mkstemp(suffix=".zip")
        os.close(fd)
        with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as zf:  # models barely compress
            for path in sorted(job_dir.rglob("*")):
                if path.is_file() and not path.name.endswith(".tmp"):
                    zf.write(path, path.relative_to(job_dir).as_posix())
        return Path(name)


def _decode_args(text: str) -> dict[str, Any]:
    try:
        args = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise JobRejected("command arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise JobRejected("command arguments must be a JSON object")
    return args


def _job_id(args: dict[str, Any]) -> str:
    job_id = str(args.get("job_id", ""))
    if not job_id:
        raise JobRejected("missing job id")
    return job_id


def _tail(path: Path, n: int) -> list[str]:
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 256 * 1024))
        return [ln.decode(errors="replace") for ln in f.read().splitlines()[-n:]]
