"""The `docker` sandbox backend: each job worker runs in a container of its own, next to the site's.

A site started with startup/docker.sh runs in a container that holds the engine's socket; its daemon asks
that engine (Docker Engine SDK) for one sibling container per worker. Because docker.sh mounts the kit at
its own path, a path the daemon names is the same path on the host, so every folder of the WorkerLaunch
is bound at its own path (read-only or read-write as given) and nothing else of the kit or host is there.

The worker container has no network at all (network_mode "none": loopback inside only, so torchrun ranks
still meet), runs as the daemon's own unprivileged uid (a root daemon's job code as local/site.yml
sandbox.run_as) with every capability dropped, a read-only root file system and a private /tmp, and the
site's cpus/memory/pids limits. It is removed when it exits, and
kill() removes it at once, which kills every process in it. Containers carry labels naming the kit and
the daemon process that started them, so a restarted daemon removes what its predecessor left behind.

The daemon talks to the worker over stdin/stdout: we attach to the container before starting it and
demultiplex Docker's stream (8-byte frame headers): stdout feeds a bounded line reader, stderr goes to the
worker's log file on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from ..kit_config import SandboxSettings
from .sandbox import Sandbox, SandboxUnavailable, WorkerLaunch
from .worker_log import CappedLog

log = logging.getLogger(__name__)

IMAGE_ENV = "FEDKIT_IMAGE"
LABEL_JOB = "org.fedkit.job"          # every worker container has it
LABEL_KIT = "org.fedkit.kit"          # the kit folder of the site that started it
LABEL_DAEMON = "org.fedkit.daemon"    # the daemon process that started it (see _DAEMON_TOKEN)
# A fresh value per daemon process: containers of this kit with another value are a dead daemon's leftovers.
_DAEMON_TOKEN = uuid.uuid4().hex
ENGINE_TIMEOUT_S = 30.0               # any one engine API call (the long wait for the exit has none: see wait())
STDOUT_QUEUE_CHUNKS = 64              # frames buffered before we stop reading the socket (backpressure)
LINE_LIMIT_BYTES = 1 << 20            # longest stdout line the daemon accepts, as asyncio's limit=1 MiB
TMP_SIZE = "1g"                       # the worker's private /tmp (tmpfs, counts against its memory)
SHM_BYTES = 2 << 30                   # /dev/shm for torchrun ranks (Docker's default 64 MiB is too small)
PUMP_DRAIN_S = 5.0                    # after the exit: how long the rest of its output may take to arrive
_HEADER_BYTES = 8
_STDOUT, _STDERR = 1, 2


def _docker_module() -> Any:
    """The SDK, imported on first use: a site that never uses this backend does not need it installed."""
    import docker

    return docker


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


class _LineReader:
    """The worker's stdout as the daemon reads it: readline() like asyncio.StreamReader's, bounded."""

    def __init__(self, limit: int = LINE_LIMIT_BYTES):
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue(STDOUT_QUEUE_CHUNKS)
        self._buffer = bytearray()
        self._ended = False  # the pump has seen the stream end (what is queued is still to be read)
        self._eof = False    # ... and this reader has taken everything that came before
        self._limit = limit

    async def feed(self, data: bytes) -> None:
        await self._chunks.put(data)  # waits while the daemon is behind: the pump stops reading the socket

    def feed_eof(self) -> None:
        """Never waits (the pump may be cancelled with a full queue): a readline that finds the queue empty
        after this sees EOF; one already waiting on an empty queue is woken by the marker."""
        self._ended = True
        with contextlib.suppress(asyncio.QueueFull):
            self._chunks.put_nowait(b"")

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def readline(self) -> bytes:
        """One line with its b"\\n"; what is left at EOF; b"" after EOF. ValueError past the limit."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._limit:
                self._buffer.clear()
                raise ValueError(f"worker output line longer than {self._limit} bytes")
            if self._eof:
                rest = bytes(self._buffer)
                self._buffer.clear()
                return rest
            if self._ended and self._chunks.empty():
                self._eof = True
                continue
            chunk = await self._chunks.get()
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True


class _Stdin:
    """The worker's stdin: write/drain like asyncio.StreamWriter; close() ends it (half-close) but keeps
    stdout flowing, as closing a subprocess's stdin pipe does."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self._closed = False

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._closed or self._writer.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write_eof()


class DockerWorker:
    """A running worker container, with what the daemon needs of asyncio.subprocess.Process."""

    def __init__(self, container_id: str, pid: int, stdin: _Stdin, stdout: _LineReader,
                 exit_task: asyncio.Task[int], pump_task: asyncio.Task[None], remove: Any):
        self.container_id = container_id
        self.pid = pid  # the worker's PID as the engine's host sees it: for logs, never for signals
        self.stdin = stdin
        self.stdout = stdout
        self._exit_task = exit_task
        self._pump_task = pump_task
        self._remove = remove

    @property
    def returncode(self) -> int | None:
        if not self._exit_task.done() or self._exit_task.cancelled():
            return None
        return self._exit_task.result() if self._exit_task.exception() is None else -9

    async def wait(self) -> int:
        """The exit status. No deadline of its own: the daemon bounds every task and kills the worker."""
        try:
            code = await asyncio.shield(self._exit_task)
        except Exception:  # the engine went away mid-wait: count it as killed
            code = -9
        # the rest of its output follows the exit at once; a pump still stuck after that waits on a daemon
        # that no longer reads stdout, so it is stopped (the reader still reports EOF)
        await asyncio.wait({self._pump_task}, timeout=PUMP_DRAIN_S)
        self._pump_task.cancel()
        return code

    def remove(self) -> None:
        self._remove()


class DockerSandbox(Sandbox):
    """Job workers in sibling containers of the site's own, through the engine's API."""

    name = "docker"

    def __init__(self, settings: SandboxSettings, client: Any = None):
        self._settings = settings
        self._image = settings.image or os.environ.get(IMAGE_ENV) or ""
        self._client = client
        self._swept: set[str] = set()
        if os.getuid() == 0:  # never root in the worker container: local/site.yml sandbox.run_as (nobody)
            self.worker_user = settings.run_as_ids()

    # ---- the engine --------------------------------------------------------------------------------

    def _engine(self) -> Any:
        if self._client is None:
            self._client = _docker_module().from_env(timeout=int(ENGINE_TIMEOUT_S))
        return self._client

    def unavailable_reason(self) -> str | None:
        if not self._image:
            return (f"sandbox.image is not set in local/site.yml and {IMAGE_ENV} is not set "
                    "(startup/docker.sh sets it); set one, or sandbox.backend: native")
        try:
            docker = _docker_module()
        except ImportError:
            return "the Python package 'docker' is not installed (pip install -r requirements.txt)"
        try:
            self._engine().ping()
        except docker.errors.DockerException as e:
            return f"cannot reach the Docker engine ({_first_line(e)}); start the site with startup/docker.sh"
        except Exception as e:  # requests' connection errors and the like
            return f"cannot reach the Docker engine ({_first_line(e)}); start the site with startup/docker.sh"
        try:
            self._engine().images.get(self._image)
        except docker.errors.ImageNotFound:
            return f"the sandbox image '{self._image}' is not in the Docker engine; build it with startup/docker.sh"
        except docker.errors.DockerException as e:
            return f"cannot inspect the sandbox image '{self._image}' ({_first_line(e)})"
        return None

    def remove_stale(self, kit_dir: Path) -> int:
        """Remove worker containers of this kit started by an earlier daemon process; how many went."""
        api = self._engine().api
        filters = {"label": [LABEL_JOB, f"{LABEL_KIT}={kit_dir}"]}
        removed = 0
        for info in api.containers(all=True, filters=filters):
            if info.get("Labels", {}).get(LABEL_DAEMON) == _DAEMON_TOKEN:
                continue
            with contextlib.suppress(Exception):
                api.remove_container(info["Id"], force=True)
                removed += 1
        if removed:
            log.warning("removed %d job container(s) a previous run of this site left behind", removed)
        return removed

    # ---- one worker ----------------------------------------------------------------------------------

    def _container_config(self, launch: WorkerLaunch) -> dict[str, Any]:
        """create_container's arguments: the launch's folders bound at their own paths, limits, no network."""
        docker = _docker_module()
        binds: dict[str, dict[str, str]] = {}
        for path in (launch.runtime_dir, *launch.read_only):
            binds[str(path)] = {"bind": str(path), "mode": "ro"}
        for path in launch.writable:
            binds[str(path)] = {"bind": str(path), "mode": "rw"}
        env = dict(launch.env)
        limits = launch.limits
        host: dict[str, Any] = {
            "binds": binds,
            "network_mode": "none",
            "auto_remove": True,
            "init": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={TMP_SIZE}"},
            "shm_size": SHM_BYTES,
            "pids_limit": limits.pids or -1,
        }
        if limits.cpus:
            host["nano_cpus"] = int(limits.cpus * 1e9)
        if limits.memory_bytes:
            host["mem_limit"] = limits.memory_bytes
            host["memswap_limit"] = limits.memory_bytes  # no swap beyond the limit
        if launch.gpus:
            host["device_requests"] = [docker.types.DeviceRequest(
                device_ids=[str(g) for g in launch.gpus], capabilities=[["gpu"]])]
            # the granted GPUs are numbered from 0 inside the container
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(launch.gpus)))
        user = self.worker_user or (os.getuid(), os.getgid())
        kit_dir = launch.runtime_dir.parent
        return {
            "image": self._image,
            "command": list(launch.argv),
            "user": "{}:{}".format(*user),
            "environment": env,
            "working_dir": str(launch.cwd),
            "stdin_open": True,  # with detach False this also sets StdinOnce: our half-close ends its stdin
            "tty": False,
            "labels": {LABEL_JOB: "worker", LABEL_KIT: str(kit_dir), LABEL_DAEMON: _DAEMON_TOKEN},
            "host_config": self._engine().api.create_host_config(**host),
        }

    def _create_and_attach(self, launch: WorkerLaunch) -> tuple[str, socket.socket, Any]:
        """Create the container, ask to hear of its removal and attach to its stdin/stdout/stderr, all
        before it starts: nothing it prints is lost, and an exit however fast is still reported."""
        api = self._engine().api
        kit_dir = launch.runtime_dir.parent
        if str(kit_dir) not in self._swept:
            self.remove_stale(kit_dir)
            self._swept.add(str(kit_dir))
        container_id = api.create_container(**self._container_config(launch))["Id"]
        try:
            exit_status = self._exit_waiter(container_id)
            attached = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            # our own descriptor for the upgraded connection, to hand to asyncio
            sock = socket.socket(fileno=os.dup(attached.fileno()))
            attached.close()
            sock.setblocking(False)
        except Exception:
            self._remover(container_id)()
            raise
        return container_id, sock, exit_status

    def _exit_waiter(self, container_id: str) -> Any:
        """Register a wait for the container's removal (auto-remove follows its exit) and return a function
        that blocks until then and returns its exit status. The engine answers the request's headers once
        the wait is registered, so a container started after this cannot slip past it. A client of its
        own, with no read timeout: the wait lasts as long as the job (the daemon bounds that)."""
        waiter = _docker_module().from_env(timeout=None)
        try:
            response = waiter.api._post(waiter.api._url("/containers/{0}/wait", container_id),
                                        params={"condition": "removed"}, stream=True)
            response.raise_for_status()
        except Exception:
            waiter.close()
            raise

        def status() -> int:
            try:
                return int(response.json().get("StatusCode", -9))
            finally:
                response.close()
                waiter.close()

        return status

    def _start(self, container_id: str) -> int:
        api = self._engine().api
        api.start(container_id)
        with contextlib.suppress(Exception):
            return int(api.inspect_container(container_id)["State"]["Pid"])
        return 0

    def _remover(self, container_id: str) -> Any:
        def remove() -> None:
            with contextlib.suppress(Exception):
                self._engine().api.remove_container(container_id, force=True)

        return remove

    async def start(self, launch: WorkerLaunch) -> DockerWorker:
        reason = await asyncio.to_thread(self.unavailable_reason)
        if reason:
            raise SandboxUnavailable(reason)
        try:
            container_id, sock, exit_status = await asyncio.to_thread(self._create_and_attach, launch)
        except Exception as e:
            raise SandboxUnavailable(f"cannot create the job's container ({_first_line(e)})") from None
        remove = self._remover(container_id)
        exit_task = asyncio.create_task(asyncio.to_thread(exit_status))
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT_BYTES)
            log_file = CappedLog(launch.log_path)  # the job's stderr, bounded (runtime.client.worker_log)
        except Exception:
            sock.close()
            await asyncio.to_thread(remove)
            raise
        stdout = _LineReader()
        pump_task = asyncio.create_task(self._pump(reader, stdout, log_file))
        try:
            pid = await asyncio.to_thread(self._start, container_id)
        except Exception as e:
            await asyncio.to_thread(remove)
            raise SandboxUnavailable(f"cannot start the job's container ({_first_line(e)})") from None
        log.info("job worker container %s started from image %s", container_id[:12], self._image)
        return DockerWorker(container_id, pid, _Stdin(writer), stdout, exit_task, pump_task, remove)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, stdout: _LineReader, log_file: CappedLog) -> None:
        """Split Docker's multiplexed stream: stdout frames to the daemon, stderr frames to the log file."""
        try:
            while True:
                header = await reader.readexactly(_HEADER_BYTES)
                size = int.from_bytes(header[4:8], "big")
                payload = await reader.readexactly(size) if size else b""
                if header[0] == _STDOUT:
                    await stdout.feed(payload)
                elif header[0] == _STDERR:
                    await asyncio.to_thread(log_file.write, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            stdout.feed_eof()
            log_file.close()

    def describe_limits(self, limits: Any) -> dict[str, str]:
        """What the engine enforces of `limits` (for the site's audit): all of it, through the cgroups it
        sets up for the container."""
        return {"cpus": "docker" if limits.cpus else "not set", "memory": "docker" if limits.memory_bytes
                else "not set", "pids": "docker" if limits.pids else "not set", "network": "none"}

    def kill(self, proc: Any) -> None:
        """Remove the worker's container: the engine SIGKILLs every process in it. One API call, made on
        the spot so a daemon that is shutting down still gets it done."""
        if isinstance(proc, DockerWorker):
            proc.remove()
