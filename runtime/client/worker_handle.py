"""The daemon's side of the training worker: start it, send a command, await its reply, stop it.
Awaiting is asynchronous, so the daemon keeps heartbeating while the learner trains."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import FedkitError

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


class WorkerFailed(FedkitError):
    """The training worker reported an error or died."""


class WorkerHandle:
    def __init__(self, proc: asyncio.subprocess.Process, job_id: str):
        self._proc = proc
        self.job_id = job_id
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, *, python: str, kit: Path, job_dir: Path, work_dir: Path, site: str, job_id: str,
                    data_root: str, gpus: list[int], learner: str, learner_args: dict[str, Any],
                    log_path: Path, nproc: int = 1, ready_timeout_s: float = 300.0) -> WorkerHandle:
        # several ranks: torchrun starts them; rank 0 speaks to us over the inherited stdin/stdout
        launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [])
        cmd = [python or sys.executable, *launcher, "-m", "runtime.client.worker", "--job-dir", str(job_dir),
               "--work-dir", str(work_dir), "--site", site, "--job-id", job_id, "--data-root", data_root,
               "--gpus", ",".join(map(str, gpus)), "--learner", learner,
               "--learner-args", json.dumps(learner_args)]
        env = {**_env_without_pythonpath(), "PYTHONPATH": str(kit), "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        with log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                cwd=str(work_dir), env=env, limit=1 << 20,
                start_new_session=True)  # its own process group: kill() reaches every torchrun rank
        handle = cls(proc, job_id)
        ready = await handle._read_reply(ready_timeout_s)
        if not ready.get("ok"):
            await handle.stop()
            raise WorkerFailed(ready.get("error", "worker failed to start"))
        log.info("training worker for job %s started (pid %d)", job_id, proc.pid)
        return handle

    async def call(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one command and await its reply. Cancelling a call kills the worker: its reply would
        otherwise be read as the answer to the next command, and it may still be writing files."""
        async with self._lock:
            if self._proc.returncode is not None:
                raise WorkerFailed(f"training worker exited with code {self._proc.returncode}")
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps(command) + "\n").encode())
                await self._proc.stdin.drain()
                reply = await self._read_reply(timeout_s)
            except asyncio.CancelledError:
                self.kill()
                await asyncio.shield(self._proc.wait())
                raise
        if not reply.get("ok"):
            raise WorkerFailed(reply.get("error", "unknown worker error"))
        return reply

    async def _read_reply(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise WorkerFailed(f"training worker gave no answer within {timeout_s:g} s") from None
        if not line:
            code = await self._proc.wait()
            raise WorkerFailed(f"training worker exited with code {code} (see the site log)")
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    async def stop(self) -> None:
        if self._proc.returncode is not None:
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
        if self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _env_without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
