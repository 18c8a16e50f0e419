"""The site's disk against a job that fills it (local/site.yml sandbox.min_free_disk_mb): no worker starts
below the floor; a running one is stopped when free space falls below it, with the reason recorded before
the kill, and the job's folders are emptied; off, it watches nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runtime.client import disk_guard
from runtime.client.disk_guard import DiskGuard, empty_folders, free_mb
from runtime.errors import JobRejected


class FakeDisk:
    def __init__(self, free: list[float]) -> None:
        self.readings = list(free)

    def __call__(self, path: Path) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def test_no_worker_starts_below_the_floor(tmp_path: Path) -> None:
    with pytest.raises(JobRejected) as err:
        DiskGuard(tmp_path, 1024, FakeDisk([900.0])).check_room("job-1")
    assert "job job-1 not started" in str(err.value) and "900 MiB free" in str(err.value)
    assert "sandbox.min_free_disk_mb (1024)" in str(err.value)
    DiskGuard(tmp_path, 1024, FakeDisk([2048.0])).check_room("job-1")  # room: no error
    DiskGuard(tmp_path, None, FakeDisk([0.0])).check_room("job-1")  # off


def test_a_job_that_fills_the_disk_is_stopped_and_its_folders_emptied(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(disk_guard, "CHECK_INTERVAL_S", 0.001)
    scratch, outbox = tmp_path / "scratch", tmp_path / "outbox"
    (scratch / "deep").mkdir(parents=True)
    outbox.mkdir()
    (scratch / "deep" / "big.bin").write_bytes(b"x" * 1000)
    (outbox / "result.safetensors").write_bytes(b"y")
    events: list[str] = []

    def stop(reason: str) -> None:
        events.append(reason)
        assert (scratch / "deep").exists(), "the reason is recorded and the worker killed before the clean-up"

    def stopped(reason: str) -> None:  # the site writes (its audit) only now: a full disk has room again
        events.append("recorded")
        assert not any(scratch.iterdir()) and not any(outbox.iterdir())

    guard = DiskGuard(tmp_path, 1024, FakeDisk([5000.0, 3000.0, 1500.0, 700.0]))
    asyncio.run(asyncio.wait_for(guard.watch("job-1", (scratch, outbox), stop, stopped), 5))
    reason, recorded = events
    assert recorded == "recorded"
    assert reason.startswith("job job-1 stopped on this site: the disk holding its workspace fell to 700 MiB free")
    assert "takes no more of its tasks" in reason and "\n" not in reason
    assert scratch.is_dir() and outbox.is_dir() and not any(scratch.iterdir()) and not any(outbox.iterdir())


def test_plenty_of_room_stops_nothing_until_cancelled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(disk_guard, "CHECK_INTERVAL_S", 0.001)
    events: list[str] = []

    async def watch_a_while() -> None:
        task = asyncio.create_task(DiskGuard(tmp_path, 1024, FakeDisk([9000.0])).watch("j", (), events.append))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(watch_a_while())
    assert events == []
    asyncio.run(asyncio.wait_for(DiskGuard(tmp_path, None).watch("j", (), events.append), 1))  # off: returns
    assert events == []


def test_free_space_is_the_file_systems(tmp_path: Path) -> None:
    import shutil

    assert free_mb(tmp_path) == pytest.approx(shutil.disk_usage(tmp_path).free / (1 << 20), rel=0.01)


def test_an_ended_jobs_scratch_and_outbox_are_emptied(tmp_path: Path) -> None:
    """What a job's code left on the site's disk goes when the server says the job ended (or was aborted), and
    the model-sized files the daemon kept for the job's next rounds go with it."""
    from runtime.client.job_folders import JobFolders
    from tests.runtime.client.test_site_refusals import FakeServer, _daemon

    daemon = _daemon(tmp_path, FakeServer())
    folders = JobFolders(daemon._ws / "jobs" / "job-a")
    folders.create()
    (folders.scratch / "checkpoints").mkdir()
    (folders.scratch / "checkpoints" / "epoch-9.pt").write_bytes(b"x" * 1000)
    (folders.outbox / "train-3.safetensors").write_bytes(b"y")
    (folders.inbox / "round_0003_train").mkdir(parents=True)  # kept: keep_updates is the job's own request
    (folders.inbox / "last_global.safetensors").write_bytes(b"m" * 1000)  # the privacy step's reference
    folders.reuse.mkdir()
    (folders.reuse / "received.spare").write_bytes(b"m" * 1000)  # a file kept to be written over

    asyncio.run(daemon._abandon_job("job-a"))

    assert folders.scratch.is_dir() and not any(folders.scratch.iterdir()) and not any(folders.outbox.iterdir())
    assert (folders.inbox / "round_0003_train").is_dir()
    assert not (folders.inbox / "last_global.safetensors").exists() and not folders.reuse.exists()


def test_a_job_that_uses_up_the_files_is_stopped_too(tmp_path: Path, monkeypatch) -> None:
    # 30,000 empty files used every inode of a workspace with its free bytes untouched; the guard saw bytes only
    monkeypatch.setattr(disk_guard, "CHECK_INTERVAL_S", 0.001)
    files = iter([500_000, 20_000, 9_000])
    events: list[str] = []
    guard = DiskGuard(tmp_path, 1024, FakeDisk([5000.0]), inodes=lambda _: next(files))
    asyncio.run(asyncio.wait_for(guard.watch("job-1", (), events.append), 5))
    (reason,) = events
    assert "had room for only 9000 more files" in reason and "\n" not in reason
    with pytest.raises(JobRejected, match="room for only 9000 more files"):
        DiskGuard(tmp_path, 1024, FakeDisk([5000.0]), inodes=lambda _: 9_000).check_room("job-2")
    DiskGuard(tmp_path, 1024, FakeDisk([5000.0]), inodes=lambda _: None).check_room("job-2")  # btrfs: no count


def test_a_tree_of_any_depth_or_lock_is_emptied_and_links_are_not_followed(tmp_path: Path) -> None:
    # a job's 1,200-deep tree made shutil.rmtree raise RecursionError, which stopped the site
    scratch, outside = tmp_path / "scratch", tmp_path / "outside.txt"
    outside.write_text("the site's")
    scratch.mkdir()
    fd = os.open(scratch, os.O_RDONLY)
    for _ in range(1200):  # by descriptor, as a job would: the path is too long to name
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.write(big := os.open("big.bin", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), b"x" * 1000)
    os.close(big)
    os.close(fd)
    (scratch / "link").symlink_to(outside)
    (scratch / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    (scratch / "locked").mkdir()
    (scratch / "locked" / "f").write_text("y")
    (scratch / "locked").chmod(0o500)
    scratch.chmod(0o500)
    assert empty_folders((scratch,)) == []
    assert scratch.is_dir() and not any(scratch.iterdir())
    assert outside.read_text() == "the site's" and (tmp_path / "outside.txt").exists()
