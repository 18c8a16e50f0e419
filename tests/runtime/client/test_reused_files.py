"""A site writes model-sized files every round: the model it receives, the worker's result, and the
daemon's copy of that out of the sandbox's reach. Each is written over an earlier round's file (pages the
page cache already holds cost a fraction of new ones), and no reuse may ever let one round's bytes reach
another's reader or survive where a shorter file ends."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from runtime.client.job_folders import JobFolders, take_result
from runtime.client.reused_files import ReusedFiles, SpareModel
from runtime.client.worker import SiteState, handle
from runtime.file_reuse import held_here
from runtime.learner import Learner, SiteContext, TrainResult
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


def _download(spare: SpareModel, path: Path, data: bytes) -> int:
    """One model received at `path`, as the daemon writes it; the inode it landed in."""
    with spare.open(path) as f:
        f.write(data)
        f.truncate()
    return path.stat().st_ino


def _retired(spare: SpareModel, reference: Path, data: bytes, held: bool) -> int:
    """The site's reference model `data` retired as the spare; its inode."""
    reference.write_bytes(data)
    inode = reference.stat().st_ino
    spare.retire(reference, held=held)
    return inode


def test_the_spare_model_is_written_over_only_when_the_worker_let_it_go(folders: JobFolders) -> None:
    spare = SpareModel(folders.reuse)
    reference = folders.inbox / "last_global.safetensors"
    inode = _retired(spare, reference, b"round 1 model, long", held=False)
    assert not reference.exists()  # out of the inbox: the worker cannot open it again
    assert _download(spare, folders.inbox / "global_in.part", b"round 3") == inode
    assert (folders.inbox / "global_in.part").read_bytes() == b"round 3"
    assert _download(spare, folders.inbox / "next.part", b"x") != inode  # taken: the next download gets a new file


def test_a_model_the_worker_still_holds_or_another_name_links_is_never_written_over(folders: JobFolders) -> None:
    spare = SpareModel(folders.reuse)
    held_inode = _retired(spare, folders.inbox / "last_global.safetensors", b"round 1", held=True)
    assert _download(spare, folders.inbox / "a.part", b"round 3") != held_inode
    assert (folders.reuse / "received.spare").read_bytes() == b"round 1"

    linked = folders.inbox / "last_global.safetensors"
    linked.write_bytes(b"round 2")
    os.link(linked, folders.inbox / "round_0002_train.safetensors")  # its task folder kept (keep_updates)
    spare.retire(linked, held=False)
    assert linked.exists()  # left where it is: the other name must keep reading round 2
    _download(spare, folders.inbox / "b.part", b"round 4")
    assert (folders.inbox / "round_0002_train.safetensors").read_bytes() == b"round 2"


class _DeltaLearner(Learner):
    """Adds 1 to every tensor as a delta; with `keep`, keeps the first model it was given (its own business)."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__(SiteContext(site="s", job_id="j", data_root=None, work_dir=Path(".")))
        self.keep, self.kept = keep, None

    def train(self, weights, round):
        if self.keep and self.kept is None:
            self.kept = weights
        return TrainResult({k: np.ones_like(v) for k, v in weights.items()}, n_samples=1, is_delta=True)

    def validate(self, weights):
        return {"n_samples": 1.0}


@pytest.mark.parametrize("keeps, held", [(False, False), (True, True)])
def test_the_worker_says_whether_it_still_maps_the_model_it_trained_on_before(tmp_path: Path, keeps: bool,
                                                                              held: bool) -> None:
    """After training round 2, the worker's own state maps round 2's model only; a learner that kept round
    1's arrays keeps its map, and the worker says so: the daemon then never writes over that file."""
    learner, local = _DeltaLearner(keeps), SiteState()
    for r in (1, 2):
        save_file({"w": np.full(4096, float(r), np.float32)}, tmp_path / f"global_{r}.safetensors")
        handle(learner, {"op": "train", "weights": str(tmp_path / f"global_{r}.safetensors"), "round": r,
                         "out": str(tmp_path / f"delta_{r}.safetensors")}, local)
    assert held_here((tmp_path / "global_1.safetensors").stat().st_ino) is held
    assert held_here((tmp_path / "global_2.safetensors").stat().st_ino)  # the model it just trained
    with (tmp_path / "delta_1.safetensors").open("rb"):
        assert held_here((tmp_path / "delta_1.safetensors").stat().st_ino)  # open, not mapped


def test_a_folder_that_cannot_keep_anything_is_still_removed(folders: JobFolders) -> None:
    """The daemon removes a task's folder in a finally: keeping a file must never fail the site (a full
    disk, a reuse/ folder that cannot be made)."""
    folders.reuse.write_bytes(b"not a folder")  # mkdir of reuse/ fails
    pool = ReusedFiles(folders.reuse)
    dest = _round(folders, pool, 1, b"a" * 10)
    pool.reclaim(dest.parent)
    assert not dest.parent.exists()
