"""WorkerHandle believes nothing the worker says: a reply that breaks the rules fails the task with one
line and stops the worker. A stand-in worker (an executable script in place of the interpreter) plays
the hostile part, started through the `off` sandbox so only the checks are under test."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WorkerFailed, WorkerHandle, WorkerTimedOut, worker_env

REPLY_TIMEOUT_S = 30.0


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An 'interpreter' that ignores its arguments, says it is ready, then answers one command with `body`."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps({{'ok': True, 'ready': True}}),"
                      f" flush=True)\ncmd = json.loads(sys.stdin.readline())\n" + textwrap.dedent(body)
                      + "\nsys.stdin.readline()\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


async def _train_with(tmp_path: Path, body: str) -> dict:
    folders = JobFolders(tmp_path / "job")
    folders.create()
    folders.code.mkdir()
    handle = await WorkerHandle.start(
        sandbox=OffSandbox(), python=str(_fake_python(tmp_path, body)), kit=tmp_path, folders=folders,
        site="site-1", job_id="job-1", data_root="", gpus=[], learner="m:C", learner_args={},
        log_path=tmp_path / "worker.log", ready_timeout_s=REPLY_TIMEOUT_S)
    try:
        return await handle.call_writing({"op": "train", "weights": "w", "round": 1}, tmp_path / "delta",
                                         REPLY_TIMEOUT_S)
    finally:
        await handle.stop()
        assert not handle.alive


def test_a_well_behaved_worker_result_is_taken(tmp_path):
    reply = asyncio.run(_train_with(tmp_path, """
        open(cmd["out"], "wb").write(b"weights")
        print(json.dumps({"ok": True, "n_samples": 3, "metrics": {"loss": 0.1}, "validation": {}}), flush=True)
    """))
    assert reply["n_samples"] == 3 and (tmp_path / "delta").read_bytes() == b"weights"


@pytest.mark.parametrize(("body", "expected"), [
    ('print(json.dumps({"ok": True, "metrics": {}, "validation": {}}), flush=True)',
     "a train reply must carry n_samples"),
    ('print(json.dumps({"ok": True, "n_samples": 1, "metrics": {"a b": 1}}), flush=True)',
     "metric name #1 (3 characters) is not allowed"),
    ('sys.stdout.write("x" * (2 << 20) + "\\n"); sys.stdout.flush()', "longer than 1048576 bytes"),
    ('os.symlink("/etc/hostname", cmd["out"])\nprint(json.dumps({"ok": True, "n_samples": 1}), flush=True)',
     "cannot be opened safely"),
])
def test_a_hostile_reply_fails_the_task_with_one_line(tmp_path, body, expected):
    with pytest.raises(WorkerFailed) as info:
        asyncio.run(_train_with(tmp_path, body))
    assert str(info.value).startswith("worker reply refused: ") and expected in str(info.value)
    assert not (tmp_path / "delta").exists()


def test_the_worker_environment_keeps_no_secrets():
    env = worker_env({"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "s", "FEDKIT_TOKEN": "t", "CUDA_HOME": "/c",
                      "LC_ALL": "C", "HOME": "/root"})
    assert env == {"PATH": "/usr/bin", "CUDA_HOME": "/c", "LC_ALL": "C"}


_REPORT_BLAS_SPIN = """
    spin = float(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "-1"))
    open(cmd["out"], "wb").write(b"weights")
    print(json.dumps({"ok": True, "n_samples": 1, "metrics": {"blas_spin": spin}, "validation": {}}), flush=True)
"""


@pytest.mark.parametrize(("site_value", "expected"), [(None, 20.0), ("26", 26.0)])
def test_a_worker_idles_blas_threads_early_unless_the_site_says(tmp_path, monkeypatch, site_value, expected):
    """Idle OpenBLAS threads spinning for 0.1 s at every pause cost the other workers on the site their cores:
    workers get a short spin, and the site's own OPENBLAS_THREAD_TIMEOUT wins."""
    if site_value is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", site_value)
    assert asyncio.run(_train_with(tmp_path, _REPORT_BLAS_SPIN))["metrics"]["blas_spin"] == expected


def _never_ready_python(tmp_path: Path) -> Path:
    """An 'interpreter' that notes its pid, then hangs as job code stuck in its imports or constructor would."""
    script = tmp_path / "stuck_python"
    pid_file = str(tmp_path / "pid")
    script.write_text(f"#!{sys.executable}\nimport os, time\nopen({pid_file!r}, 'w').write(str(os.getpid()))\n"
                      "while True:\n    time.sleep(1)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _start_stuck(tmp_path: Path, ready_timeout_s: float):
    folders = JobFolders(tmp_path / "job")
    folders.create()
    folders.code.mkdir()
    return WorkerHandle.start(
        sandbox=OffSandbox(), python=str(_never_ready_python(tmp_path)), kit=tmp_path, folders=folders,
        site="site-1", job_id="job-1", data_root="", gpus=[], learner="m:C", learner_args={},
        log_path=tmp_path / "worker.log", ready_timeout_s=ready_timeout_s)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_worker_cancelled_while_it_starts_is_killed(tmp_path):
    # the job aborted (or ended) while its code was still importing: nothing else holds the process, so a
    # start that let it live left job code running on the site's data after its job was over
    async def scenario() -> int:
        starting = asyncio.ensure_future(_start_stuck(tmp_path, REPLY_TIMEOUT_S))
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
            await asyncio.sleep(0.05)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        return int((tmp_path / "pid").read_text())

    assert _gone(asyncio.run(scenario()))


def test_a_worker_that_never_gets_ready_is_stopped_at_the_start_timeout(tmp_path):
    with pytest.raises(WorkerTimedOut, match="gave no answer within 1 s"):
        asyncio.run(_start_stuck(tmp_path, 1.0))
    assert _gone(int((tmp_path / "pid").read_text()))


class _ExitedProcess:
    """A worker that has already exited, as the native sandbox reports it (memory_exhausted from its cgroup)."""

    def __init__(self, code: int, memory_exhausted: bool):
        self.pid, self.returncode, self.memory_exhausted = 1, code, memory_exhausted
        self.stdin = self.stdout = None

    async def wait(self) -> int:
        return self.returncode


@pytest.mark.parametrize(("memory_exhausted", "expected"), [
    (True, "training worker was killed (exit code -9): it used more memory than this site lets a job use "
           "(local/site.yml sandbox.memory_mb)"),
    (False, "training worker exited with code -9 (see the site log)"),
])
def test_a_worker_killed_for_its_memory_says_so(tmp_path, memory_exhausted, expected):
    handle = WorkerHandle(_ExitedProcess(-9, memory_exhausted), "job-1", OffSandbox(), JobFolders(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(WorkerFailed) as info:
        asyncio.run(handle.call({"op": "train"}, REPLY_TIMEOUT_S))
    assert str(info.value) == expected
