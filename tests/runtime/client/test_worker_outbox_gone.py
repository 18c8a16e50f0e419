"""Found by the chaos soak (issue 16): when the worker's outbox was gone by the time the daemon took the
result (job code can remove or replace its own outbox; a site's job folder can vanish under it), the
daemon died with a FileNotFoundError traceback and the site stayed offline. Now only that task fails,
with one line, and the worker is stopped (restarted for the next task)."""

from __future__ import annotations

import asyncio
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WorkerFailed, WorkerHandle

REPLY_TIMEOUT_S = 30.0


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An 'interpreter' that says it is ready, then answers one command with `body` (as in test_worker_handle)."""
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


@pytest.mark.parametrize("body", [
    'import shutil\nopen(cmd["out"], "wb").write(b"w")\nshutil.rmtree(os.path.dirname(cmd["out"]))\n'
    'print(json.dumps({"ok": True, "n_samples": 1}), flush=True)',
    'import shutil\nd = os.path.dirname(cmd["out"])\nshutil.rmtree(d)\nos.symlink("/etc", d)\n'
    'print(json.dumps({"ok": True, "n_samples": 1}), flush=True)',
])
def test_an_outbox_gone_before_the_result_is_taken_fails_only_the_task(tmp_path, body):
    with pytest.raises(WorkerFailed) as info:
        asyncio.run(_train_with(tmp_path, body))
    assert "could not take the worker's result" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "delta").exists()
