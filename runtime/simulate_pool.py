"""A pool of worker processes for runtime.simulate: a few processes (about one per core), each hosting the
learners of many virtual sites and running their tasks one at a time.

One process per site would spend 100 Python interpreters and torch imports on 100 sites; one thread per site
would fight over the GIL and over torch's process-wide state (its RNG, its optimizer hooks). A pool process
runs the worker's own command handler (runtime/client/worker.py `handle`) on the learner of the site a
command names, with the learner loaded as the worker loads it (the job's custom/ on sys.path). Its torch
and BLAS threads are capped so the pool shares the cores instead of each process taking them all.

The parent and the pool speak JSON lines over the process's pipes, and weights move through safetensors
files, as the daemon and the worker do: no pickle. Sites are given to processes round-robin in the order
named, so a site always runs in the same process and its learner keeps its state between rounds.

    pool = await ProcessPool.start(job_dir, spec.client.learner, {"site-1": data_1, ...}, work_root, processes=2)
    try:
        result = await simulate(spec, pool, out)
    finally:
        await pool.close()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client.worker_replies import WorkerReplyRefused, parse_reply
from .client.worker_threads import granted_cores, short_blas_spin, thread_env
from .errors import ConfigError
from .simulate import SiteTaskFailed

REPLY_LIMIT_BYTES = 1 << 20
START_TIMEOUT_S = 300.0   # loading learners reads each site's data: generous, but a wait with an end
CLOSE_TIMEOUT_S = 10.0


def pool_shape(n_sites: int, processes: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(processes, torch threads per process): by default one process per core (no more than sites), and
    the cores split evenly between them, at least one thread each."""
    cores = cores or granted_cores()
    n = max(1, min(processes if processes else cores, n_sites))
    return n, max(1, cores // n)


@dataclass
class _Member:
    process: asyncio.subprocess.Process
    lock: asyncio.Lock
    log: Path


class ProcessPool:
    """The running pool; a `runtime.simulate.SitePool`."""

    def __init__(self, members: list[_Member], placement: dict[str, int], task_timeout_s: float):
        self._members, self._placement, self._timeout_s = members, placement, task_timeout_s

    @property
    def sites(self) -> list[str]:
        return list(self._placement)

    @property
    def processes(self) -> int:
        return len(self._members)

    @classmethod
    async def start(cls, job_dir: Path, learner_path: str, learner_args: dict[str, Any],
                    data_roots: dict[str, Path | None], work_root: Path, processes: int | None = None,
                    threads: int | None = None, task_timeout_s: float = 600.0) -> ProcessPool:
        """Start the processes and load every site's learner in its process; a learner that fails to load
        raises ConfigError naming the site, with every process already stopped."""
        n, default_threads = pool_shape(len(data_roots), processes)
        threads = threads or default_threads
        work_root.mkdir(parents=True, exist_ok=True)
        env = {**short_blas_spin(os.environ), **thread_env(threads),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                             *filter(None, [os.environ.get("PYTHONPATH")])])}
        members = []
        for i in range(n):
            log = work_root / f"pool-{i}.log"
            with log.open("ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "runtime.simulate_pool", "--job-dir", str(job_dir), "--learner",
                    learner_path, "--args", json.dumps(learner_args), "--threads", str(threads),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, env=env,
                    limit=REPLY_LIMIT_BYTES)
            members.append(_Member(proc, asyncio.Lock(), log))
        placement = {site: i % n for i, site in enumerate(data_roots)}
        pool = cls(members, placement, task_timeout_s)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(*(pool._add(site, root, work_root / "sites" / site)
                                       for site, root in data_roots.items()))
        except BaseException:
            await pool.close()
            raise
        return pool

    async def _add(self, site: str, data_root: Path | None, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._call(site, {"add": {"site": site, "data_root": str(data_root) if data_root else "",
                                            "work_dir": str(work_dir)}}, START_TIMEOUT_S)
        except SiteTaskFailed as e:
            raise ConfigError(f"site '{site}': the job's learner did not load ({e}); fix the learner or the "
                              "site's data folder") from None

    async def run(self, site: str, command: dict[str, Any]) -> dict[str, Any]:
        return await self._call(site, {"site": site, "command": command}, self._timeout_s)

    async def _call(self, site: str, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        member = self._members[self._placement[site]]
        async with member.lock:
            proc = member.process
            if proc.returncode is not None or proc.stdin is None or proc.stdout is None:
                raise SiteTaskFailed(f"pool process {proc.pid} has exited (see {member.log})")
            try:
                proc.stdin.write(json.dumps(message).encode() + b"\n")
                await proc.stdin.drain()
                async with asyncio.timeout(timeout_s):
                    line = await proc.stdout.readline()
            except TimeoutError:
                proc.kill()  # its other sites fail from here on, as sites whose worker hung would
                raise SiteTaskFailed(f"site '{site}': no answer within {timeout_s:g} s (task_timeout_s); "
                                     f"its pool process was stopped") from None
            except (ConnectionError, ValueError) as e:
                raise SiteTaskFailed(f"pool process {proc.pid}: {e} (see {member.log})") from None
        if not line:
            raise SiteTaskFailed(f"pool process {proc.pid} exited mid-task (see {member.log})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SiteTaskFailed(str(reply.get("error", "no error given")))
        try:  # the checks a site's daemon makes of its worker's reply (names, values, counts)
            parse_reply(line)
        except WorkerReplyRefused as e:
            raise SiteTaskFailed(f"site '{site}': {e}") from None
        return reply

    async def close(self) -> None:
        """Stop every process: end of input, then a kill for any still running after CLOSE_TIMEOUT_S."""
        for member in self._members:
            if member.process.stdin is not None and not member.process.stdin.is_closing():
                member.process.stdin.close()
        for member in self._members:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await member.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    member.process.kill()
                await member.process.wait()


# ---- the pool process ---------------------------------------------------------------------------------


def _serve(job_dir: Path, learner_path: str, learner_args: dict[str, Any], threads: int) -> int:
    import torch  # after OMP_NUM_THREADS is set by the parent; the cap below covers inter-op threads too

    from .client.worker import SiteState, _load_learner, _one_line, handle
    from .learner import SiteContext
    from .procs import die_with_parent

    die_with_parent()
    torch.set_num_threads(threads)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a learner prints goes to the log, never into the reply channel
    sys.stdout = sys.stderr
    learners: dict[str, Any] = {}
    states: dict[str, SiteState] = {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if "add" in message:
                add = message["add"]
                context = SiteContext(site=add["site"], job_id="simulated",
                                      data_root=Path(add["data_root"]) if add["data_root"] else None,
                                      work_dir=Path(add["work_dir"]))
                learners[add["site"]] = _load_learner(job_dir, learner_path, learner_args, context)
                states[add["site"]] = SiteState()
                reply: dict[str, Any] = {"ok": True}
            else:
                site = message["site"]
                reply = handle(learners[site], message["command"], states[site])
        except Exception as e:  # the learner is the job's code: its failure is that site's answer
            reply = {"ok": False, "error": _one_line(e)}
        replies.write(json.dumps(reply) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.simulate_pool")
    p.add_argument("--job-dir", type=Path, required=True)
    p.add_argument("--learner", required=True)
    p.add_argument("--args", default="{}")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    return _serve(a.job_dir, a.learner, json.loads(a.args), a.threads)


if __name__ == "__main__":
    sys.exit(main())
