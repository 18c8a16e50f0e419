"""The daemon takes a result from the worker's outbox only as a plain file of bounded size, never
through a link, and copies it to a path it owns."""

from __future__ import annotations

import os

import pytest

from runtime.client.job_folders import JobFolders, take_result
from runtime.client.worker_replies import WorkerReplyRefused


@pytest.fixture
def folders(tmp_path):
    folders = JobFolders(tmp_path / "job")
    folders.create()
    return folders


def test_a_plain_result_is_copied_and_removed_from_the_outbox(folders):
    (folders.outbox / "train-1.safetensors").write_bytes(b"weights")
    dest = folders.inbox / "delta.safetensors"
    assert take_result(folders.outbox, "train-1.safetensors", dest, max_bytes=100) == 7
    assert dest.read_bytes() == b"weights"
    assert not (folders.outbox / "train-1.safetensors").exists()


def test_a_symlink_to_a_secret_is_refused(folders, tmp_path):
    secret = tmp_path / "client.key"
    secret.write_text("KEY")
    (folders.outbox / "train-1.safetensors").symlink_to(secret)
    dest = folders.inbox / "delta.safetensors"
    with pytest.raises(WorkerReplyRefused, match="cannot be opened safely"):
        take_result(folders.outbox, "train-1.safetensors", dest, max_bytes=100)
    assert not dest.exists()


def test_a_fifo_does_not_block_and_is_refused(folders):
    os.mkfifo(folders.outbox / "train-1.safetensors")
    with pytest.raises(WorkerReplyRefused, match="not a regular file"):
        take_result(folders.outbox, "train-1.safetensors", folders.inbox / "d", max_bytes=100)


def test_an_oversized_or_missing_result_is_refused(folders):
    (folders.outbox / "big").write_bytes(b"x" * 101)
    with pytest.raises(WorkerReplyRefused, match="more than the 100 allowed"):
        take_result(folders.outbox, "big", folders.inbox / "d", max_bytes=100)
    with pytest.raises(WorkerReplyRefused, match="wrote no result file"):
        take_result(folders.outbox, "absent", folders.inbox / "d", max_bytes=100)


def test_a_sparse_result_larger_than_the_disk_holds_above_its_floor_is_refused_before_copying(folders):
    # a job writes a header and truncates its result to 3 GiB: no disk space for it, the whole disk to copy
    with open(folders.outbox / "train-1.safetensors", "wb") as f:
        f.write(b"header")
        f.truncate(3 << 30)
    dest = folders.inbox / "delta.safetensors"
    with pytest.raises(WorkerReplyRefused, match="more than the 1048576 this site's disk holds above"):
        take_result(folders.outbox, "train-1.safetensors", dest, max_bytes=64 << 30, room=1 << 20)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_the_disk_guard_gives_the_room_above_its_floor(tmp_path):
    from runtime.client.disk_guard import MIB, DiskGuard

    assert DiskGuard(tmp_path, 1024, free=lambda _: 1536.0).room_bytes() == 512 * MIB
    assert DiskGuard(tmp_path, 1024, free=lambda _: 900.0).room_bytes() == 0
    assert DiskGuard(tmp_path, None).room_bytes() is None


def test_a_result_the_job_extends_while_it_is_copied_is_refused_after_its_checked_size(folders):
    # the job's code still holds its result and makes it sparse gigabytes once the copy starts: it cost the job
    # nothing and the site's disk all its room (the size checks ran once, at open)
    result = folders.outbox / "train-1.safetensors"
    result.write_bytes(b"w" * (3 << 20))
    written: list[int] = []

    class Growing:
        def __init__(self, path):
            self._f = open(path, "wb")  # noqa: SIM115 - closed by __exit__

        def write(self, data):
            if not written:
                os.truncate(result, 60 << 30)  # 60 GiB, sparse
            written.append(len(data))
            return self._f.write(data)

        def truncate(self):
            return self._f.truncate()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    dest = folders.inbox / "delta.safetensors"
    with pytest.raises(WorkerReplyRefused, match="changed size while being read"):
        take_result(folders.outbox, "train-1.safetensors", dest, max_bytes=64 << 30, open_dest=Growing)
    assert sum(written) == 3 << 20  # what was checked, not a byte more
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
