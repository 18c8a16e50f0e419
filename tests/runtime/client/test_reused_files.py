"""A site writes a model-sized file every round twice: the worker's result, and the daemon's copy of it
out of the sandbox's reach. Each is written over the last round's file (pages the page cache already
holds cost a fraction of new ones), and neither reuse may ever let one round's bytes reach another's
reader or survive where a shorter file ends."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from runtime.client.job_folders import JobFolders, take_result
from runtime.client.reused_files import ReusedFiles
from runtime.weights import load_file, save_file


@pytest.fixture
def folders(tmp_path: Path) -> JobFolders:
    folders = JobFolders(tmp_path / "job")
    folders.create()
    return folders


def _round(folders: JobFolders, pool: ReusedFiles, number: int, content: bytes) -> Path:
    """One task: the worker's result taken into a task folder of the inbox, as the daemon does."""
    (folders.outbox / "train-1.safetensors").write_bytes(content)
    task = folders.inbox / f"round-{number}"
    task.mkdir()
    dest = task / "delta_out.safetensors"
    take_result(folders.outbox, "train-1.safetensors", dest, max_bytes=1 << 20, open_dest=pool.open)
    return dest


def test_the_daemons_copy_is_written_over_the_last_rounds_and_cut_where_it_ends(folders: JobFolders) -> None:
    pool = ReusedFiles(folders.reuse)
    first = _round(folders, pool, 1, b"a" * 5000)
    inode = first.stat().st_ino
    pool.reclaim(first.parent)
    assert not first.parent.exists() and [p.stat().st_ino for p in folders.reuse.iterdir()] == [inode]
    second = _round(folders, pool, 2, b"b" * 300)
    assert second.stat().st_ino == inode  # the same file, written over
    assert second.read_bytes() == b"b" * 300  # nothing of the longer first round left past its end
    assert not list(folders.reuse.iterdir())


def test_a_copy_linked_under_another_name_is_not_reused(folders: JobFolders, tmp_path: Path) -> None:
    """A hard link outside the task folder (what `keep_updates` or another reader holds) would see the next
    round's bytes: such a file is left alone. A link inside the folder goes with the folder."""
    pool = ReusedFiles(folders.reuse)
    first = _round(folders, pool, 1, b"a" * 100)
    os.link(first, first.with_suffix(".sent"))  # the upload's name for it, in the same folder
    pool.reclaim(first.parent)
    assert len(list(folders.reuse.iterdir())) == 1
    second = _round(folders, pool, 2, b"b" * 100)
    outside = tmp_path / "kept-elsewhere"
    os.link(second, outside)
    pool.reclaim(second.parent)
    assert not list(folders.reuse.iterdir())  # not kept: the link outside still reads round 2
    _round(folders, pool, 3, b"c" * 100)
    assert outside.read_bytes() == b"b" * 100


def test_only_the_daemons_copies_are_kept_never_the_model_the_worker_maps(folders: JobFolders) -> None:
    pool = ReusedFiles(folders.reuse)
    dest = _round(folders, pool, 1, b"a" * 100)
    received = dest.parent / "global_in.safetensors"
    received.write_bytes(b"model")
    mapped_elsewhere = folders.root / "last_global.safetensors"
    os.link(received, mapped_elsewhere)
    pool.reclaim(dest.parent)
    assert [p.stat().st_ino for p in folders.reuse.iterdir()] != [mapped_elsewhere.stat().st_ino]
    assert mapped_elsewhere.read_bytes() == b"model"
    assert len(list(folders.reuse.iterdir())) == 1


def test_at_most_keep_files_are_kept_and_clear_deletes_them(folders: JobFolders) -> None:
    pool = ReusedFiles(folders.reuse, keep=1)
    a, b = _round(folders, pool, 1, b"a" * 10), _round(folders, pool, 2, b"b" * 10)
    pool.reclaim(a.parent)
    pool.reclaim(b.parent)
    assert len(list(folders.reuse.iterdir())) == 1
    pool.clear()
    assert not folders.reuse.exists()
    assert _round(folders, pool, 3, b"c" * 10).read_bytes() == b"c" * 10  # a new file again


def test_a_file_another_pool_handed_out_is_not_taken(folders: JobFolders) -> None:
    """A task folder from before the worker restarted: its copy is simply removed."""
    dest = _round(folders, ReusedFiles(folders.reuse), 1, b"a" * 10)
    ReusedFiles(folders.reuse).reclaim(dest.parent)
    assert not dest.parent.exists() and not folders.reuse.exists()


def test_the_workers_result_is_written_over_its_last_and_linked_under_each_name(tmp_path: Path) -> None:
    reuse = tmp_path / ".train-result"
    big = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
    small = {"w": np.full(10, 2.0, dtype=np.float32)}
    save_file(big, tmp_path / "train-1.safetensors", reuse=reuse)
    inode = reuse.stat().st_ino
    taken = (tmp_path / "train-1.safetensors").read_bytes()
    (tmp_path / "train-1.safetensors").unlink()  # the daemon took it
    save_file(small, tmp_path / "train-2.safetensors", reuse=reuse)
    second = tmp_path / "train-2.safetensors"
    assert second.stat().st_ino == reuse.stat().st_ino == inode
    assert second.stat().st_size < len(taken)
    loaded = load_file(second)
    assert list(loaded) == ["w"] and np.array_equal(loaded["w"], small["w"])
