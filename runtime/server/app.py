"""Wires the server together from its kit and runs it until SIGTERM or an admin's shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from .. import kit_config as kc
from ..audit import AuditLog
from ..certs import check_validity, not_revoked, warn_before_expiry
from ..crl import PIN_FILE, CrlPin, load_root_ca
from ..errors import FedkitError
from ..heap import tune_malloc
from ..identity import Kind
from ..procs import (
    FILE_ONLY,
    LOG_FILE,
    hold_workspace,
    remove_pid,
    setup_logging,
    stop_event_on_signals,
    workspace,
    write_pid,
)
from ..transport import RpcServer, TlsFiles, require_kind
from .admin_service import AdminService
from .authz import Policy
from .crl_watch import CrlWatcher
from .federation import FederationService
from .handshake_watch import StderrWatch, service_reporter
from .job_quota import JobQuota
from .job_store import JobStore
from .refusals import RefusalLog
from .registry import Registry
from .runner import JobRunner
from .site_controls import SiteControls
from .taskboard import TaskBoard

log = logging.getLogger("fedkit.server")


async def serve(kit: Path, debug: bool = False, handshakes: StderrWatch | None = None) -> None:
    startup, local = kit / kc.STARTUP, kit / kc.LOCAL
    cfg = kc.load_model(startup / kc.SERVER_CONFIG, kc.ServerKitConfig)
    settings = kc.load_optional(local / "server.yml", kc.ServerLocalSettings)
    ws = workspace(kit)
    setup_logging(ws / LOG_FILE, debug)
    try:
        hold_workspace(ws, f"the server of {kit}")
        tune_malloc(one_arena=True)  # before the server starts its threads (runtime/heap.py)
        tls = TlsFiles(startup / cfg.cert, startup / cfg.key, startup / cfg.root_ca)
        check_validity(tls.own_certificate(), f"{startup / cfg.cert}")
        audit = AuditLog(ws / "audit.jsonl")
        crl = CrlWatcher(local / kc.REVOCATION_LIST, tls.root_ca, CrlPin(ws / PIN_FILE),
                         lambda problem: audit.append("crl_refused", reason=problem))
        crl.load_at_start()  # a malformed, older or missing-but-remembered CRL stops the start, with its reason
    except FedkitError as e:  # main() prints it; the log says it too, for whoever reads only the log
        log.error("server cannot start: %s", e, extra=FILE_ONLY)
        raise
    registry = Registry(settings.heartbeat_timeout_s, time.monotonic, settings.disconnect_grace_s)
    board = TaskBoard(time.monotonic)
    runner = JobRunner(JobStore(ws / "jobs"), board, registry, audit, settings.max_update_bytes_factor,
                       JobQuota(settings.max_jobs_per_admin, settings.max_job_bytes_per_admin),
                       allow_job_aggregators=settings.allow_job_aggregators, roster=[c.name for c in cfg.clients])
    controls = SiteControls()
    stop = stop_event_on_signals()
    heartbeat_interval_s = min(5.0, settings.heartbeat_timeout_s / 4)
    federation = FederationService(registry, board, runner, audit, heartbeat_interval_s,
                                   settings.max_concurrent_uploads, settings.max_concurrent_downloads, controls)
    admin = AdminService(runner, registry, Policy.load(local / "authorization.yml"), audit, cfg.org,
                         ws / LOG_FILE, controls, stop.set, settings.max_job_archive_bytes,
                         settings.max_initial_model_bytes, settings.audit_repeated_reads_s)

    host = settings.listen_host or cfg.name
    fed_server = RpcServer(tls, host, settings.fed_learn_listen_port or cfg.fed_learn_port)
    refused = RefusalLog(audit, time.monotonic)  # one log line and audit record per peer and reason a minute
    fed_server.add_federation(federation, require_kind(Kind.CLIENT, not_revoked(
        crl.revoked, on_revoked=lambda peer: registry.mark_revoked(peer.name))), refused, crl.pem)
    admin_server = RpcServer(tls, host, settings.admin_listen_port or cfg.admin_port)
    admin_server.add_admin(admin, require_kind(Kind.ADMIN, not_revoked(crl.revoked)), refused, crl.pem)
    if handshakes is not None:  # refused at the TLS handshake (another study's CA, expired): same RefusalLog
        handshakes.report_to(service_reporter(refused, {fed_server.port: "federation", admin_server.port: "admin"},
                                              asyncio.get_running_loop().call_soon_threadsafe))
    await fed_server.start()
    await admin_server.start()
    write_pid(ws)
    audit.append("server_started", project=cfg.project, name=cfg.name)
    log.info("audit log %s: %s (check with: fedkit audit verify FILE --expect-head HASH --expect-count N)",
             audit.path, audit.head())
    log.info("server %s for project %s listening on %s:%d (federation) and :%d (admin)",
             cfg.name, cfg.project, host, fed_server.port, admin_server.port)

    expiry = asyncio.create_task(warn_before_expiry(  # every site and console loses the server with it
        tls.own_certificate(), f"this server's certificate {startup / cfg.cert}", log.warning,
        ca=load_root_ca(tls.root_ca)))
    runner_task = asyncio.create_task(runner.run_forever(), name="job-runner")
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({runner_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if runner_task.done() and runner_task.exception():
        log.error("job runner stopped: %s", runner_task.exception())
    log.info("server shutting down")
    runner_task.cancel()
    stop_wait.cancel()
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner_task
    await fed_server.stop(2.0)
    await admin_server.stop(2.0)
    admin.record_pending_repeats()
    audit.append("server_stopped", name=cfg.name)
    log.info("audit log %s: %s", audit.path, audit.head())
    remove_pid(ws)
