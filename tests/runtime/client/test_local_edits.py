"""runtime/client/local_edits.py: the site notices each edit of its local/ settings after it started (it
enforces them only after a restart), once per edit."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.client.local_edits import LocalEdits


def test_each_edit_is_noticed_once(tmp_path: Path) -> None:
    (tmp_path / "job_policy.yml").write_text("allowed_orgs: [a]\n")
    edits = LocalEdits(tmp_path)
    assert edits.changed() == []

    (tmp_path / "job_policy.yml").write_text("allowed_orgs: ['*']\n")
    (tmp_path / "privacy.yml").write_text("exclude_vars: [x]\n")  # created after the start
    assert edits.changed() == ["job_policy.yml", "privacy.yml"]
    assert edits.changed() == []  # said once

    (tmp_path / "privacy.yml").unlink()  # removed: the defaults would apply after a restart
    assert edits.changed() == ["privacy.yml"]


def test_a_rewrite_with_the_same_size_is_noticed_by_its_time(tmp_path: Path) -> None:
    path = tmp_path / "site.yml"
    path.write_text("nproc: 1\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    edits = LocalEdits(tmp_path)

    path.write_text("nproc: 2\n")

    assert edits.changed() == ["site.yml"]


def test_other_files_in_local_are_not_watched(tmp_path: Path) -> None:
    edits = LocalEdits(tmp_path)
    (tmp_path / "crl.pem").write_text("read afresh at every code check")

    assert edits.changed() == []
