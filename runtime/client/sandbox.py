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
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import JobRejected


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


class Sandbox(ABC):
    """One way to run a worker. `name` is what local/site.yml calls it and what the audit records."""

    name: str = ""

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when this backend can start workers here; else one line saying why not."""

    @abstractmethod
    async def start(self, launch: WorkerLaunch) -> WorkerProcess:
        """Start the worker with stdin/stdout pipes; raise SandboxUnavailable when it cannot start."""

    @abstractmethod
    def kill(self, proc: WorkerProcess) -> None:
        """Kill the worker and everything it started, now (idempotent, never raises)."""
