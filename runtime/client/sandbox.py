"""Where a job's code runs on a site: the one small interface every sandbox backend implements.

A job's `custom/*.py` is a stranger's code. The training worker that imports it runs inside a sandbox
that sees only what it needs (contract every backend must keep, each with a test):

    - the kit's `runtime/` package, read-only (never `startup/`, `local/`, the audit log or `workspace/`);
    - the job's code folder and the site's data root, read-only;
    - one writable scratch folder (the job's work folder), and the exchange folders the daemon names;
    - no network that leaves the sandbox, loopback included; loopback *inside* it still works, so
      torchrun ranks meet;
    - CPU, memory, process and GPU limits from the site's `local/site.yml`;
    - killed with everything it started when the job ends, is aborted or the daemon stops.

Every folder is mounted at the same absolute path it has on the host, so the JSON-lines commands the
daemon sends (file paths) mean the same thing inside and outside. The daemon talks to the worker over
its stdin/stdout; a backend returns something that behaves like `asyncio.subprocess.Process`.

Backends: `native` (Linux namespaces through bubblewrap), `docker` (a sibling container through the
Docker Engine SDK), and `off` (the plain process of earlier releases; a site must ask for it).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import JobRejected
from .worker_log import CappedLog, pump

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..kit_config import SandboxSettings, SiteLocalSettings

log = logging.getLogger("fedkit.client")

FIX_HINT = "or set sandbox.backend: off in local/site.yml to run job code unconfined"
MIB = 1 << 20


class SandboxUnavailable(JobRejected):
    """No sandbox backend can start here; the site refuses job code until one can (or it turns it off)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one worker (None: no limit beyond the host's)."""

    cpus: float | None = None
    memory_bytes: int | None = None
    pids: int | None = 4096


@dataclass(frozen=True)
class WorkerLaunch:
    """One training worker to start: the command and exactly what it may see."""

    argv: tuple[str, ...]            # e.g. (python, "-m", "runtime.client.worker", ...), run inside
    env: Mapping[str, str]           # the worker's whole environment (nothing else is inherited)
    runtime_dir: Path                # the kit's runtime/ package: read-only
    read_only: tuple[Path, ...]      # job code, data root, the daemon's inbox: read-only
    writable: tuple[Path, ...]       # scratch and outbox: read-write
    gpus: tuple[int, ...]
    limits: SandboxLimits
    log_path: Path                   # the worker's stderr goes here (on the host)
    cwd: Path


class WorkerProcess(Protocol):
    """What the daemon needs of a running worker (asyncio.subprocess.Process has all of it)."""

    pid: int
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


def readable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether user uid (group gid) may list and read the folder `path`, by its mode bits."""
    try:
        info = path.stat()
    except OSError:
        return False
    shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
    return (info.st_mode >> shift) & 0o5 == 0o5


def job_user(settings: SiteLocalSettings) -> tuple[int, int] | None:
    """The (uid, gid) job code runs as where it is not this process's user: sandbox.run_as for a site run
    as root (native and docker), None otherwise (the worker is the daemon's own user, or no sandbox)."""
    if os.geteuid() != 0 or settings.sandbox.backend == "off":
        return None
    return settings.sandbox.run_as_ids()


class Sandbox(ABC):
    """One way to run a worker. `name` is what local/site.yml calls it and what the audit records."""

    name: str = ""
    # (uid, gid) the worker runs as where that is not the daemon's own user: a site run as root runs job code
    # as local/site.yml sandbox.run_as, never as root. None: the worker runs as the daemon's user.
    worker_user: tuple[int, int] | None = None

    def hand_over(self, readable: Sequence[Path], writable: Sequence[Path]) -> None:
        """Let the worker's user read the trees in `readable` (the job's code, the daemon's inbox) and write
        the folders in `writable` (scratch, outbox), where it is not the daemon's user. Readable means the
        'other' permission bits: everything sits in the job's folder, which is the daemon's and private
        (0700), so no one else on the machine gets in through them."""
        if self.worker_user is None:
            return
        for top in readable:
            share_read(top)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    share_read(Path(dirpath) / name)
        for folder in writable:
            os.chown(folder, *self.worker_user)

    def share_file(self, path: Path) -> None:
        """Let the worker's user read `path`, a file the daemon wrote for it, and enter its folder (e.g. a
        task's model in the inbox); nothing to do where the worker is the daemon's own user."""
        if self.worker_user is not None:
            share_read(path.parent)
            share_read(path)

    def can_read(self, path: Path) -> bool:
        """Whether the worker's user may list and read `path` (a folder such as the data root), by its mode.
        Always true where the worker is the daemon's own user (the daemon's own access decides)."""
        return self.worker_user is None or readable_by(path, *self.worker_user)

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when this backend can start workers here; else one line saying why not."""

    @abstractmethod
    async def start(self, launch: WorkerLaunch) -> WorkerProcess:
        """Start the worker with stdin/stdout pipes; raise SandboxUnavailable when it cannot start."""

    @abstractmethod
    def kill(self, proc: WorkerProcess) -> None:
        """Kill the worker and everything it started, now (idempotent, never raises)."""

    def describe_limits(self, limits: SandboxLimits) -> dict[str, str]:
        """What this backend really enforces of `limits`, for the audit (e.g. {"memory": "cgroup"})."""
        return {}

    async def ensure_available(self) -> None:
        """Raise SandboxUnavailable (reason and fix in one line) unless this backend can start workers.
        The check may run a short probe process, so it runs off the event loop."""
        reason = await asyncio.to_thread(self.unavailable_reason)
        if reason:
            raise SandboxUnavailable(f"job code refused: sandbox '{self.name}' is not available here: {reason}")


def share_read(path: Path) -> None:
    """Add 'other' read permission to a file, read and search to a folder; links are left alone."""
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode):
        os.chmod(path, stat.S_IMODE(info.st_mode) | 0o005)
    elif stat.S_ISREG(info.st_mode):
        os.chmod(path, stat.S_IMODE(info.st_mode) | 0o004)


class OffSandbox(Sandbox):
    """No sandbox: the worker is a plain child process with the daemon's user, files and network.

    It gets its own session, so kill() reaches every process of that group (all torchrun ranks); a
    process that calls setsid() itself escapes it. Only for sites that cannot run a sandbox and trust
    every job they accept."""

    name = "off"

    def unavailable_reason(self) -> str | None:
        return None

    async def start(self, launch: WorkerLaunch) -> WorkerProcess:
        return LoggedProcess(*await spawn_worker(launch.argv, dict(launch.env), str(launch.cwd), launch.log_path))

    def kill(self, proc: WorkerProcess) -> None:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def describe_limits(self, limits: SandboxLimits) -> dict[str, str]:
        return {"cpus": "not enforced", "memory": "not enforced", "pids": "not enforced"}


async def spawn_worker(argv: Sequence[str], env: dict[str, str], cwd: str, log_path: Path,
                       pass_fds: Sequence[int] = ()) -> tuple[asyncio.subprocess.Process, CappedLog]:
    """Start a worker process speaking JSON lines on stdin/stdout in a session of its own, and the capped
    log its stderr goes to. The log is opened first: a full disk fails there, with nothing started."""
    log_file = CappedLog(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=cwd, env=env, limit=WORKER_LINE_LIMIT_BYTES, pass_fds=tuple(pass_fds), start_new_session=True)
    except BaseException:
        log_file.close()
        raise
    return proc, log_file


class LoggedProcess:
    """A worker process whose stderr (a pipe) is copied into its bounded log (runtime.client.worker_log)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_file: CappedLog):
        self._proc = proc
        self.pid = proc.pid
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        assert proc.stderr is not None
        self.log_pump = asyncio.create_task(pump(proc.stderr, log_file), name=f"worker-log-{proc.pid}")

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()


# the longest reply line the daemon reads from a worker (a reply is a few metrics, never weights)
WORKER_LINE_LIMIT_BYTES = 1 * MIB


def limits_of(settings: SandboxSettings) -> SandboxLimits:
    """local/site.yml's sandbox limits in the units the backends use."""
    return SandboxLimits(cpus=settings.cpus,
                         memory_bytes=settings.memory_mb * MIB if settings.memory_mb is not None else None,
                         pids=settings.pids)


def choose_sandbox(settings: SandboxSettings, environ: Mapping[str, str] | None = None) -> Sandbox:
    """The backend local/site.yml asks for. `auto` is docker when this site itself runs in Docker
    (docker.sh sets FEDKIT_IN_DOCKER=1), else native. Raises SandboxUnavailable when the backend's code is
    missing; whether it can run here is `unavailable_reason()`'s answer, asked before each job."""
    environ = os.environ if environ is None else environ
    backend = settings.backend
    if backend == "auto":
        backend = "docker" if environ.get("FEDKIT_IN_DOCKER") == "1" else "native"
    if backend == "off":
        log.warning("sandbox.backend is off in local/site.yml: this job's code runs with this site's user, "
                    "files and network")
        return OffSandbox()
    module_name, class_name = {"native": (".sandbox_native", "NativeSandbox"),
                               "docker": (".sandbox_docker", "DockerSandbox")}[backend]
    try:
        module = importlib.import_module(module_name, __package__)
    except ImportError:
        raise SandboxUnavailable(f"job code refused: the {backend} sandbox backend is not available in this "
                                 f"runtime; {FIX_HINT}") from None
    return getattr(module, class_name)(settings)


async def sandbox_for_job(settings: SandboxSettings, audit: AuditLog, job_id: str,
                          choose: Callable[[SandboxSettings], Sandbox] = choose_sandbox) -> Sandbox:
    """The sandbox this job's worker starts in, checked to work here. A refusal is audited
    (`sandbox_unavailable`, with its reason) and raised as SandboxUnavailable, a JobRejected."""
    try:
        sandbox = choose(settings)
        await sandbox.ensure_available()
    except SandboxUnavailable as e:
        audit.append("sandbox_unavailable", job_id=job_id, backend=settings.backend, reason=str(e))
        raise
    return sandbox
