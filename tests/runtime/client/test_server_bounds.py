"""What a site takes from its server is bounded by the site, whatever the server sends (found by a review as
a compromised server): a job archive streaming past the largest a job may be, a task's model larger than
the room above the site's disk floor, an id a folder cannot be named after. Each fails a task, never the
daemon, and nothing is written for it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from runtime.client import daemon as daemon_module
from runtime.client.daemon import _safe_name
from runtime.client.disk_guard import DiskGuard
from runtime.errors import JobRejected
from runtime.proto import fedkit_pb2 as pb
from tests.runtime.client.test_site_refusals import FakeServer, _daemon, _events, _run_tasks, _task


class _EndlessArchive(FakeServer):
    """GetJob streams 1 MiB chunks as long as it is read, up to 64 (a bound of the test's own: a site that
    read on would fail its assertion, not fill this machine's memory)."""

    def GetJob(self, request: pb.GetJobRequest) -> Any:  # noqa: N802 (the gRPC name)
        self.job_fetches += 1
        server = self

        class Call:
            sent = 0

            def __aiter__(self) -> Any:
                return self

            async def __anext__(self) -> Any:
                if self.sent == 64:
                    raise StopAsyncIteration
                self.sent += 1
                server.chunks_sent = self.sent
                return SimpleNamespace(data=b"x" * (1 << 20))

            def cancel(self) -> None:
                server.cancelled = True

        return Call()


def test_a_job_archive_past_the_largest_a_job_may_be_is_cut_off_while_it_comes(tmp_path: Path,
                                                                               monkeypatch) -> None:
    monkeypatch.setattr(daemon_module, "MAX_JOB_ZIP_BYTES", 8 << 20)
    server = _EndlessArchive()
    daemon = _daemon(tmp_path, server)
    _run_tasks(daemon, "job-a", (("train", 1),))
    (failed,) = _events(daemon, "task_failed")
    assert "its archive passed 8 MiB while it came; refused" in failed["reason"]
    assert server.cancelled and server.chunks_sent == 9  # held at most the cap and one chunk
    assert _events(daemon, "job_received") == []


class _TaskCall:
    """A GetTask answer: the header message, then the model's bytes (never reached here)."""

    def __init__(self, header: pb.TaskHeader) -> None:
        self._messages = [pb.TaskChunk(header=header).SerializeToString(), b"\0" * 1024]
        self.cancelled = False

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        if not self._messages:
            raise StopAsyncIteration
        return self._messages.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def test_a_model_larger_than_the_room_above_the_disk_floor_is_not_downloaded(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, FakeServer())
    daemon._disk = DiskGuard(daemon._ws, 1024, free=lambda path: 1100.0)  # 76 MiB above the floor
    header = _task(daemon, "job-a", "train", 1).header
    header.payload_bytes = 100 << 20
    call = _TaskCall(header)
    daemon._bulk = SimpleNamespace(GetTask=lambda request: call)
    task = asyncio.run(daemon._poll())
    assert task is not None and task.payload_path is None and call.cancelled
    assert task.config_error.startswith("the task's model (100 MiB) would take the disk holding this site's "
                                        "workspace below local/site.yml sandbox.min_free_disk_mb (1024)")
    assert not any(task.round_dir.iterdir()), "nothing of it was written"


@pytest.mark.parametrize("bad", ["a\x00b", "a\x1b[2Jb", "", "../x", ".hidden", "x" * 129])
def test_an_id_no_folder_can_be_named_after_is_refused_in_one_line(bad: str) -> None:
    with pytest.raises(JobRejected, match="invalid id .* from the server"):
        _safe_name(bad)


def test_a_strict_site_runs_no_code_beside_the_approved_code(tmp_path: Path, monkeypatch) -> None:
    # an earlier job's code folder that could not be removed would be imported beside the approved code
    from runtime.client.job_policy import JobPolicy
    from runtime.job_code import code_hash_of_zip
    from tests.runtime.client.test_site_refusals import ARCHIVE

    policy = JobPolicy.model_validate({"code": {"approved_hashes": [code_hash_of_zip(ARCHIVE)]}})
    daemon = _daemon(tmp_path, FakeServer(), policy=policy)
    left = daemon._ws / "jobs" / "job-a" / "code" / "custom"
    left.mkdir(parents=True)
    (left / "evil.py").write_text("import os\n")
    monkeypatch.setattr(daemon_module.shutil, "rmtree", lambda path, ignore_errors=False: None)  # it resists
    _run_tasks(daemon, "job-a", (("train", 1),))
    (failed,) = _events(daemon, "task_failed")
    assert "its earlier code folder" in failed["reason"] and "could not be removed" in failed["reason"]
    assert _events(daemon, "job_received") == [] and _events(daemon, "worker_started") == []
