"""runtime/client/kept_updates.py: the site's cap on the models jobs keep (keep_updates_max_mb), oldest
first across jobs, counting what files take on disk, never following a link."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.client.kept_updates import MIB, kept_folders, trim_kept


def _kept(jobs: Path, job: str, task: str, mib: float, age_s: float) -> Path:
    folder = jobs / job / "inbox" / task
    folder.mkdir(parents=True)
    (folder / "global_in.safetensors").write_bytes(os.urandom(int(mib * MIB)))
    past = folder.stat().st_mtime - age_s
    os.utime(folder, (past, past))
    return folder


def test_the_oldest_kept_folders_go_first_across_jobs_until_the_rest_fits(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    oldest = _kept(jobs, "job-a", "round_0001_train", 1.5, age_s=300)
    middle = _kept(jobs, "job-b", "round_0001_train", 1.0, age_s=200)
    newest = _kept(jobs, "job-a", "round_0002_train", 1.0, age_s=100)
    (jobs / "job-a" / "inbox" / "last_global.safetensors").write_bytes(b"x" * MIB)  # a file: not a kept folder
    outside = tmp_path / "site-data"
    outside.mkdir()
    (outside / "scan.nii").write_bytes(b"x" * (3 * MIB))
    (jobs / "job-b" / "inbox" / "round_0009_train").symlink_to(outside)  # never followed, never counted

    assert [f.path for f in kept_folders(jobs)] == [oldest, middle, newest]
    removed = trim_kept(jobs, max_mb=2)
    assert [f.path for f in removed] == [oldest]
    assert middle.exists() and newest.exists() and (outside / "scan.nii").exists()
    assert [f.path for f in trim_kept(jobs, max_mb=0)] == [middle, newest]  # 0: the site keeps none
    assert (outside / "scan.nii").exists() and (jobs / "job-a" / "inbox" / "last_global.safetensors").exists()
