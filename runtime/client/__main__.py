"""`python -m runtime.client --kit KIT_DIR`: what a client kit's start.sh runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

# gRPC's C core logs each failed TLS handshake to stderr (INFO lines, twice per attempt); the site says it
# in one line a person can act on instead (runtime/tls_diagnosis.py). Set before grpc is imported, and only
# where site IT has not chosen a level (GRPC_VERBOSITY=INFO brings them back for a deeper look).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .. import kit_config as kc  # noqa: E402
from ..audit import AuditLog  # noqa: E402
from ..certs import check_validity, warn_before_expiry  # noqa: E402
from ..crl import load_root_ca  # noqa: E402
from ..errors import ConfigError, FedkitError  # noqa: E402
from ..heap import tune_malloc  # noqa: E402
from ..procs import (  # noqa: E402
    FILE_ONLY,
    LOG_FILE,
    hold_workspace,
    private_umask,
    remove_pid,
    setup_logging,
    stop_event_on_signals,
    workspace,
    write_pid,
)
from ..transport import TlsFiles  # noqa: E402
from . import cgroups  # noqa: E402
from .daemon import ClientDaemon  # noqa: E402
from .disk_guard import free_mb  # noqa: E402
from .job_policy import JobPolicy  # noqa: E402
from .privacy_policy import PRIVACY_FILE, PrivacyPolicy  # noqa: E402
from .sandbox import job_user, limits_of, readable_by  # noqa: E402
from .worker_threads import granted_cores  # noqa: E402

log = logging.getLogger("fedkit.client")


async def run(kit: Path, debug: bool, once: bool = False) -> bool:
    """Run the site daemon until stopped; True when the server asked for a restart."""
    startup, local = kit / kc.STARTUP, kit / kc.LOCAL
    if not startup.is_dir():  # no kit here (a wrong --kit): no workspace to create, the loader says what is missing
        kc.load_model(startup / kc.CLIENT_CONFIG, kc.ClientKitConfig)
    # logging first: a site restarted from the admin console (restart client) starts again through start.sh
    # (a new process, this same path), where nobody reads stderr; why it cannot start must be in
    # workspace/log.txt, for site IT and, once the site runs again, for tail_log
    ws = workspace(kit)
    setup_logging(ws / LOG_FILE, debug)
    try:
        hold_workspace(ws, f"the site of {kit}")
        cfg = kc.load_model(startup / kc.CLIENT_CONFIG, kc.ClientKitConfig)
        settings = kc.load_optional(local / "site.yml", kc.SiteLocalSettings)
        policy = JobPolicy.load(local / "job_policy.yml")
        privacy = PrivacyPolicy.load(local / PRIVACY_FILE)
        tune_malloc(one_arena=True)  # before gRPC starts its threads (runtime/heap.py)
        tls = TlsFiles(startup / cfg.cert, startup / cfg.key, startup / cfg.root_ca)
        tls.read()  # a missing, unreadable or group/world-readable key stops the start here, with the fix
        check_validity(tls.own_certificate(), str(startup / cfg.cert))
        check_data_root(settings.data_root, kit, job_user(settings))
    except FedkitError as e:  # main() prints it to stderr, as its one line: here it goes to the log file only
        log.error("site cannot start: %s", e, extra=FILE_ONLY)
        raise
    write_pid(ws)
    audit = AuditLog(ws / "audit.jsonl")
    rules = policy.model_dump(mode="json")
    audit.append("client_started", site=cfg.name, org=cfg.org, privacy_floor=privacy.model_dump(mode="json"),
                 code_rule=rules["code"], allowed_orgs=rules["allowed_orgs"],
                 allowed_roles=rules["allowed_roles"])  # what this site enforces, from the start
    log.info("audit log %s: %s", audit.path, audit.head())
    log.info("site %s (%s) starting; server %s:%d", cfg.name, cfg.org, cfg.server_host, cfg.fed_learn_port)
    for line in machine_mismatches(settings):
        log.warning("%s", line)
    floor = settings.sandbox.min_free_disk_mb
    if floor is not None and (free := free_mb(ws)) < floor:
        log.warning("the disk holding this site's workspace has %.0f MiB free, below local/site.yml "
                    "sandbox.min_free_disk_mb (%d): no job's worker starts until there is room", free, floor)
    for line in privacy_gaps(privacy):
        log.warning("%s", line)
    daemon = ClientDaemon(kit, cfg, settings, ws, audit, policy, stop_event_on_signals(), privacy=privacy,
                         once=once)
    expiry = asyncio.create_task(warn_before_expiry(
        tls.own_certificate(), f"this site's certificate {startup / cfg.cert}", log.warning,
        ca=load_root_ca(tls.root_ca)))
    try:
        await daemon.run()
    except OSError as e:  # the workspace's disk (full, gone): what the site does can no longer be recorded
        line = (f"site stopped: {e.filename or 'the workspace'}: {e.strerror or e}; free room on the disk holding "
                "the workspace and start the site again")
        log.error("%s", line, extra=FILE_ONLY)
        raise FedkitError(line) from None
    finally:
        expiry.cancel()
        try:
            audit.append("client_stopped", site=cfg.name)
            log.info("audit log %s: %s", audit.path, audit.head())
        except OSError as e:
            log.error("audit log %s: cannot record the stop (%s)", audit.path, e.strerror or e)
        remove_pid(ws)
    return daemon.restart_requested


def privacy_gaps(privacy: PrivacyPolicy) -> list[str]:
    """Lines for what a site's differential privacy leaves open, said at its start."""
    lines = []
    if privacy.reports.is_open and (privacy.gaussian_dp or privacy.dp_budget or privacy.dp_site_budget):
        lines.append("this site puts differential privacy on the weights, but a job's metrics, logged scalars and "
                     "error messages leave as its code writes them, without noise; local/privacy.yml `reports:` "
                     "limits them (see local/privacy.yml.example)")
    if privacy.gaussian_dp and not (privacy.dp_budget or privacy.dp_site_budget):
        lines.append("local/privacy.yml adds gaussian_dp noise but sets no dp_budget or dp_site_budget: every "
                     "release is counted, none is refused, so a server sending the same task again and again "
                     "could average the noise away; dp_site_budget bounds what all jobs together may take")
    return lines


def machine_mismatches(settings: kc.SiteLocalSettings, cores: int | None = None,
                       nvidia_devices: list[str] | None = None, memory_cgroup: bool | None = None) -> list[str]:
    """Lines for local/site.yml settings this machine cannot honour: GPUs it does not show, more cores than it
    has, a memory limit without a memory cgroup (the native sandbox then holds it per process only).
    Warnings, not refusals: a container may show devices differently, and the job still runs."""
    cores = granted_cores() if cores is None else cores
    if nvidia_devices is None:
        nvidia_devices = [p.name for p in Path("/dev").glob("nvidia[0-9]*")]
    lines = []
    # counted, not matched by number: a container given some of a host's GPUs shows /dev/nvidia3 as CUDA's 0
    missing = [g for g in settings.gpus if g >= len(nvidia_devices)]
    if missing:
        lines.append(f"local/site.yml gpus lists {', '.join(map(str, missing))}, which this machine does not show "
                     f"(/dev/nvidiaN; it shows {len(nvidia_devices)}): jobs asking for them fail or train on CPU")
    cpus = settings.sandbox.cpus
    if cpus is not None and cpus > cores:
        lines.append(f"local/site.yml sandbox.cpus is {cpus:g}, above the {cores} cores this site may use: a job "
                     f"gets {cores} threads per rank at most")
    memory = settings.sandbox.memory_mb
    if memory is not None and settings.sandbox.backend in ("auto", "native") and not os.environ.get("FEDKIT_IN_DOCKER"):
        if memory_cgroup is None:
            memory_cgroup = cgroups.plan(limits_of(settings.sandbox)).enforced_by("memory") is not None
        if not memory_cgroup:
            lines.append(f"local/site.yml sandbox.memory_mb is {memory}, but this site cannot create a memory cgroup "
                         "(it is not root and has no delegated cgroup): the limit holds per process only, and a "
                         "job's memfd and System V shared memory escape it; run the site as root, or give it a "
                         "delegated cgroup, where jobs must be held to it")
    return lines


def check_data_root(data_root: str | None, kit: Path, job_user: tuple[int, int] | None = None) -> None:
    """Refuse, at the site's start, a data root every job would fail on: missing (not mounted yet), a file,
    unreadable by this site's user or by `job_user` (the user job code runs as; None: this one); and one
    that holds this kit: every job would see what lies beside the site's data (other kits' keys, a CA's
    state, this kit's folder where a sandbox cannot hide it). Raises ConfigError with the fix."""
    if not data_root:
        return
    given = Path(data_root)
    if not given.exists():
        raise ConfigError(f"local/site.yml: data_root {data_root} does not exist (not created, or not mounted "
                          "yet); create or mount it, or correct the path, and start the site again")
    if not given.is_dir():
        raise ConfigError(f"local/site.yml: data_root {data_root} is a file; give the folder that holds this "
                          "site's data")
    root = given.resolve()
    if kit == root or root in kit.parents:
        raise ConfigError(f"local/site.yml: data_root {data_root} holds this kit ({kit}): every job reads all "
                          "of it, keys of other kits included; give the folder that holds only this site's data")
    if not os.access(given, os.R_OK | os.X_OK):
        raise ConfigError(f"local/site.yml: data_root {data_root} cannot be read by this site's user "
                          f"(uid {os.geteuid()}); give it read access (chmod -R u+rX or g+rX) and start again")
    if job_user is not None and not readable_by(given, *job_user):
        uid, gid = job_user
        raise ConfigError(f"local/site.yml: data_root {data_root} cannot be read by the user job code runs as "
                          f"({uid}:{gid}, sandbox.run_as); let it read the data (e.g. chgrp -R {gid} {data_root}; "
                          f"chmod -R g+rX {data_root}) or set run_as to a user that may")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkit-client")
    parser.add_argument("--kit", type=Path, required=True, help="the unzipped client startup kit")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--once", action="store_true",
                        help="exit 1 instead of retrying when the server refuses this site's certificate "
                             "(at once) or cannot be reached (after 60 s); for first starts and scripts")
    args = parser.parse_args(argv)
    private_umask()  # workspace, logs, models and audit trail: owner only
    try:
        restart = asyncio.run(run(args.kit.resolve(), args.debug, args.once), debug=args.debug)
    except FedkitError as e:
        print(f"fedkit client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if restart:
        return restart_through_start_sh(args.kit.resolve(), ["--debug"] if args.debug else [])
    return 0


def restart_through_start_sh(kit: Path, extra_args: list[str]) -> int:
    """Replace this process with the kit's own startup/start.sh, so the kit's signature is checked again
    before any of its code runs (someone may have changed it while we ran). start.sh refuses a changed
    kit with one line and exit code 1. Returns only when start.sh cannot be run at all."""
    start_sh = kit / kc.STARTUP / "start.sh"
    bash = shutil.which("bash")
    if bash is None or not start_sh.is_file():
        print(f"fedkit client: cannot restart: {start_sh if bash else 'bash'} not found; start the site again "
              "with startup/start.sh", file=sys.stderr)
        return 1
    os.environ["FEDKIT_PYTHON"] = sys.executable  # the interpreter start.sh chose the first time
    try:
        os.execv(bash, [bash, str(start_sh), *extra_args])
    except OSError as e:
        print(f"fedkit client: cannot restart through {start_sh}: {e.strerror}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
