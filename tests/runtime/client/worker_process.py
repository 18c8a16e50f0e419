"""A real training worker for a test: the job folder made with one learner module, the worker started
through the daemon's WorkerHandle in the `off` sandbox (no gRPC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WorkerHandle

REPO = Path(__file__).resolve().parents[3]
REPLY_TIMEOUT_S = 120.0


async def start_worker(tmp_path: Path, module: str, source: str, learner: str,
                       args: dict[str, Any]) -> tuple[WorkerHandle, JobFolders]:
    """Job folders under tmp_path/job with `source` as custom/<module>.py, and its worker running `learner`."""
    folders = JobFolders(tmp_path / "job")
    folders.create()
    (folders.code / "custom").mkdir(parents=True)
    (folders.code / "custom" / f"{module}.py").write_text(source)
    handle = await WorkerHandle.start(
        sandbox=OffSandbox(), python="", kit=REPO, folders=folders, site="site-1", job_id="job-1", data_root="",
        gpus=[], learner=learner, learner_args=args, log_path=tmp_path / "worker.log",
        ready_timeout_s=REPLY_TIMEOUT_S)
    return handle, folders
