"""Found by the chaos soak (issue 16): when the worker's outbox was gone by the time the daemon took the
result (job code can remove or replace its own outbox; a site's job folder can vanish under it), the
daemon died with a FileNotFoundError traceback and the site stayed offline. Now only that task fails,
with one line, and the worker is stopped (restarted for the next task)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.client.worker_handle import WorkerFailed
from tests.runtime.client.test_worker_handle import _train_with  # the fake worker and one train call


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
