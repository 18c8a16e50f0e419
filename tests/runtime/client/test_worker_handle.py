"""WorkerHandle believes nothing the worker says: a reply that breaks the rules fails the task with one
line and stops the worker. A stand-in worker (an executable script in place of the interpreter) plays
the hostile part, started through the `off` sandbox so only the checks are under test."""

from __future__ import annotations

import asyncio
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WorkerFailed, WorkerHandle, worker_env

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
