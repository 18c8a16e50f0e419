"""The daemon's side of the training worker: start it in the site's sandbox, send a command, await and
check its reply, stop it. Awaiting is asynchronous, so the daemon keeps heartbeating while the learner
trains. The worker runs job code, so its replies and result files are checked before use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import FedkitError
from ..tasks import TaskKind
from .job_folders import JobFolders, take_result
from .reused_files import ReusedFiles, SpareModel
from .sandbox import (
    WORKER_LINE_LIMIT_BYTES,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    WorkerLaunch,
    WorkerProcess,
)
from .worker_replies import WorkerReply, WorkerReplyRefused, parse_reply
from .worker_threads import short_blas_spin, thread_env

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
WORKER_START_TIMEOUT_S = 300.0  # to import the job's code and build its learner (loading a large model)
MAX_RESULT_BYTES = 64 << 30  # a result file (weights) larger than this is refused


class WorkerFailed(FedkitError):
    """The training worker reported an error or died."""


class WorkerTimedOut(WorkerFailed):
    """The training worker gave no answer in the time a task had; it was stopped."""


class WorkerOutOfMemory(WorkerFailed):
    """The kernel killed the training worker for passing the site's memory limit."""


# what job code sees when the sandbox keeps it from a file, a folder or the network: Python's own words
# would send a researcher looking for a missing file or a server that is down
_SANDBOX_SYMPTOMS = ("FileNotFoundError", "PermissionError", "Read-only file system", "ConnectionRefusedError",
                     "Network is unreachable", "gaierror", "Temporary failure in name resolution")
SANDBOX_HINT = ("the job ran in this site's sandbox: it sees only its code, the data root and the models it "
                "received, writes only scratch/ and outbox/, and has no network")


def _with_sandbox_hint(error: str, backend: str) -> str:
    """The worker's error, with a word on the sandbox when it looks like the sandbox's doing."""
    if backend == "off" or not any(symptom in error for symptom in _SANDBOX_SYMPTOMS):
        return error
    return f"{error} ({SANDBOX_HINT})"


class WorkerHandle:
    def __init__(self, proc: WorkerProcess, job_id: str, sandbox: Sandbox, folders: JobFolders,
                 max_result_bytes: int = MAX_RESULT_BYTES, room: Callable[[], int | None] = lambda: None):
        self._proc = proc
        self.job_id = job_id
        self.sandbox = sandbox
        self._outbox = folders.outbox
        self.results = ReusedFiles(folders.reuse)  # the daemon's copies of results, each written over the last
        self.received = SpareModel(folders.reuse)  # a model trained on two rounds back, for a download to reuse
        self._max_result_bytes = max_result_bytes
        self._room = room  # bytes the site's disk holds above its floor (DiskGuard.room_bytes)
        self._results = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, *, sandbox: Sandbox, python: str, kit: Path, folders: JobFolders, site: str, job_id: str,
                    data_root: str, gpus: list[int], learner: str, learner_args: dict[str, Any],
                    log_path: Path, nproc: int = 1, limits: SandboxLimits | None = None,
                    max_result_bytes: int = MAX_RESULT_BYTES, ready_timeout_s: float = WORKER_START_TIMEOUT_S,
                    threads: int | None = None, room: Callable[[], int | None] = lambda: None,
                    scalar_steps: dict[str, int] | None = None) -> WorkerHandle:
        """Start the job's worker through `sandbox`; raises SandboxUnavailable or WorkerFailed."""
        python = shutil.which(python or sys.executable) or python or sys.executable
        # several ranks: torchrun starts them; rank 0 speaks to us over the inherited stdin/stdout
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [])
        cmd = [python, *launcher, "-m", "runtime.client.worker", "--job-dir", str(folders.code),
               "--work-dir", str(folders.scratch), "--site", site, "--job-id", job_id, "--data-root", data_root,
               "--gpus", ",".join(map(str, gpus)), "--learner", learner,
               "--learner-args", json.dumps(learner_args), "--scalar-steps", json.dumps(scalar_steps or {})]
        env = {**short_blas_spin(worker_env(os.environ)), "PYTHONPATH": str(kit), "PYTHONUNBUFFERED": "1",
               "HOME": str(folders.scratch)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if threads is not None:
            env.update(thread_env(threads))  # the site's setting wins over what the daemon inherited
        if data_root and not Path(data_root).is_dir():  # the site's start checked it: since gone or unmounted
            raise SandboxUnavailable(f"job code refused: data_root {data_root} is no longer there (unmounted or "
                                     "moved since the site started)")
        if data_root and not sandbox.can_read(Path(data_root)):  # false only where job code runs as another user
            uid, gid = sandbox.worker_user or (0, 0)
            raise SandboxUnavailable(
                f"job code refused: data_root {data_root} cannot be read by the user job code runs "
                f"as here ({uid}:{gid}, local/site.yml sandbox.run_as); let it read the data (e.g. chgrp -R {gid} "
                "DATA_ROOT; chmod -R g+rX DATA_ROOT) or set run_as to a user that may")
        await asyncio.to_thread(sandbox.hand_over, (folders.code, folders.inbox), (folders.scratch, folders.outbox))
        read_only = [folders.code, folders.inbox] + ([Path(data_root)] if data_root else [])
        launch = WorkerLaunch(argv=tuple(cmd), env=env, runtime_dir=kit / "runtime", read_only=tuple(read_only),
                              writable=(folders.scratch, folders.outbox), gpus=tuple(gpus),
                              limits=limits or SandboxLimits(), log_path=log_path, cwd=folders.scratch)
        proc = await sandbox.start(launch)
        handle = cls(proc, job_id, sandbox, folders, max_result_bytes, room)
        try:  # importing the job's code and building its learner: job code runs from here on
            ready = await handle._read_reply(ready_timeout_s)
        except asyncio.CancelledError:  # the job ended or was aborted while its code was still starting: the
            handle.kill()  # handle never reached the daemon, so nobody else would ever stop this process
            await asyncio.shield(proc.wait())
            raise
        if not ready.ok:
            await handle.stop()
            raise WorkerFailed(ready.error or "worker failed to start")
        log.info("training worker for job %s started in sandbox '%s' (pid %d)", job_id, sandbox.name, proc.pid)
        return handle

    async def call(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one command and await its checked reply (see worker_replies). Cancelling a call kills the
        worker: its reply would otherwise be read as the answer to the next command, and it may still be
        writing files. A refused reply stops the worker too: it broke the protocol, so it is not asked again."""
        async with self._lock:
            if self._proc.returncode is not None:
                raise self._exit_error(await self._proc.wait())
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps(command) + "\n").encode())
                await self._proc.stdin.drain()
                reply = await self._read_reply(timeout_s)
            except asyncio.CancelledError:
                self.kill()
                await asyncio.shield(self._proc.wait())
                raise
        if not reply.ok:
            raise WorkerFailed(_with_sandbox_hint(reply.error or "unknown worker error", self.sandbox.name))
        if command.get("op") == TaskKind.TRAIN and reply.n_samples is None:
            await self.stop()
            raise WorkerFailed("worker reply refused: a train reply must carry n_samples")
        return reply.model_dump()

    async def call_writing(self, command: dict[str, Any], dest: Path, timeout_s: float) -> dict[str, Any]:
        """Like call(), for a command that writes weights: the worker writes into its outbox, and the file
        is copied to `dest` (a daemon-owned path) only if it is a plain file of bounded size."""
        self._results += 1
        name = f"{command.get('op', 'result')}-{self._results}.safetensors"
        reply = await self.call({**command, "out": str(self._outbox / name)}, timeout_s)
        try:
            await asyncio.to_thread(take_result, self._outbox, name, dest, self._max_result_bytes, self.results.open,
                                    self._room())
        except WorkerReplyRefused as e:
            await self.stop()
            raise WorkerFailed(str(e)) from None
        except OSError as e:  # the outbox removed or replaced (job code can), or the site's disk full: fail
            await self.stop()  # this task, not the daemon (an uncaught OSError here ended the whole daemon)
            raise WorkerFailed(f"could not take the worker's result {name} from its outbox "
                               f"({e.strerror or e}); the worker is restarted for the next task") from None
        return reply

    async def _read_reply(self, timeout_s: float) -> WorkerReply:
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout_s)
        except TimeoutError:  # it is stuck in job code and reads no stop request: a grace period only waits
            self.kill()
            await self._proc.wait()
            raise WorkerTimedOut(f"training worker gave no answer within {timeout_s:g} s") from None
        except ValueError:  # the line outgrew the stream's limit; what follows is out of step, so stop
            self.kill()
            await self._proc.wait()
            raise WorkerFailed(f"worker reply refused: a reply line is longer than "
                               f"{WORKER_LINE_LIMIT_BYTES} bytes") from None
        if not line:
            raise self._exit_error(await self._proc.wait())
        try:
            return parse_reply(line)
        except WorkerReplyRefused as e:
            await self.stop()
            raise WorkerFailed(str(e)) from None

    def _exit_error(self, code: int) -> WorkerFailed:
        if getattr(self._proc, "memory_exhausted", False):  # the sandbox's cgroup counted an OOM kill
            return WorkerOutOfMemory(f"training worker was killed (exit code {code}): it used more memory than "
                                     "this site lets a job use (local/site.yml sandbox.memory_mb)")
        return WorkerFailed(f"training worker exited with code {code} (see the site log)")

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    async def stop(self) -> None:
        """Ask the worker to stop, kill it after STOP_GRACE_S, and always await it (so the sandbox can
        release what it holds for the job, e.g. its cgroups)."""
        await asyncio.to_thread(self.results.clear)
        if self._proc.returncode is not None:
            await self._proc.wait()
            return
        with contextlib.suppress(Exception):
            assert self._proc.stdin is not None
            self._proc.stdin.write(b'{"op": "stop"}\n')
            await self._proc.stdin.drain()
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            self.kill()
            await self._proc.wait()

    def kill(self) -> None:
        """Kill the worker and everything it started (the sandbox knows how)."""
        self.sandbox.kill(self._proc)


# what a worker may inherit of the daemon's environment (nothing else: it may hold tokens or passwords)
_ENV_NAMES = {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "PYTHONDONTWRITEBYTECODE",
              "PYTHONSAFEPATH", "PYTHONHASHSEED"}
_ENV_PREFIXES = ("LC_", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "GLOO_")


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the daemon's environment a worker gets: locale, paths and the GPU/threading knobs."""
    return {k: v for k, v in environ.items() if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}
