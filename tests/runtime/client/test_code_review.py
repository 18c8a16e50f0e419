"""Refused code kept for site IT's review (runtime/client/code_review.py): bounded, unpacked only on request
and safely, and never approved from an archive that changed since it was refused. The daemon's side (what
it keeps when its code rule refuses a job) runs end to end in tests/e2e/test_site_privacy.py."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from runtime.client import code_review
from runtime.client.code_review import keep_for_review, main, pending, unpack
from runtime.errors import ConfigError, JobRejected
from runtime.job_code import code_hash_of_zip


def _archive(body: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("custom/learner.py", body)
        zf.writestr("config_fed_client.yml", "learner: {path: learner:L}\n")
    return buffer.getvalue()


def _keep(ws: Path, job_id: str, archive: bytes) -> bool:
    return keep_for_review(ws, job_id, archive, {"code_sha256": code_hash_of_zip(archive), "job_name": job_id,
                                                 "submitter": {"name": "lead@study.org"}, "reason": "not approved"})


def test_a_kept_job_unpacks_as_received_and_runs_nothing(tmp_path: Path) -> None:
    archive = _archive("raise SystemExit('never imported')\n")
    assert _keep(tmp_path, "job-1", archive) and _keep(tmp_path, "job-1", archive)  # kept, once
    assert len(list((tmp_path / "review").iterdir())) == 2
    facts, dest, files = unpack(tmp_path, "job-1")
    assert facts["code_sha256"] == code_hash_of_zip(archive) and dest == tmp_path / "review" / "job-1"
    assert [name for name, _ in files] == ["config_fed_client.yml", "custom/learner.py"]
    assert (dest / "custom" / "learner.py").read_text() == "raise SystemExit('never imported')\n"


def test_an_archive_changed_since_it_was_refused_is_not_offered_for_approval(tmp_path: Path) -> None:
    _keep(tmp_path, "job-1", _archive("x = 1\n"))
    (tmp_path / "review" / "job-1.zip").write_bytes(_archive("x = 2\n"))  # someone swapped what will be read
    with pytest.raises(JobRejected, match="the file changed since the site refused it"):
        unpack(tmp_path, "job-1")


def test_only_the_newest_are_kept_and_unknown_names_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(code_review, "MAX_KEPT", 3)
    for i in range(5):
        _keep(tmp_path, f"job-{i}", _archive(f"x = {i}\n"))
        os.utime(tmp_path / "review" / f"job-{i}.zip", (1000 + i, 1000 + i))  # file times a second apart
        code_review._trim(tmp_path / "review")
    assert [f["job_id"] for f in pending(tmp_path)] == ["job-4", "job-3", "job-2"]
    assert sorted(p.name for p in (tmp_path / "review").iterdir()) == [
        f"job-{i}.{ext}" for i in (2, 3, 4) for ext in ("json", "zip")]
    for name in ("job-0", "../review/job-4", ".hidden"):
        with pytest.raises(ConfigError, match=r"no refused job .* kept for review \(kept: job-4, job-3, job-2\)"):
            unpack(tmp_path, name)


def test_a_new_version_of_reviewed_code_is_shown_as_its_diff(tmp_path: Path, capsys) -> None:
    kit = tmp_path / "kit"
    ran = kit / "workspace" / "jobs" / "job-0" / "code" / "custom"  # approved, ran here
    ran.mkdir(parents=True)
    (ran / "learner.py").write_text("lr = 0.1\nepochs = 2\n")
    (ran / "helper.py").write_text("x = 1\n")
    (ran / "weights.bin").write_bytes(b"\x00\xff" * 10)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # the new version: one line changed, a file gone, one added
        zf.writestr("custom/learner.py", "lr = 0.1\nepochs = 2\nimport socket  # new\n")
        zf.writestr("custom/weights.bin", b"\x01\xff" * 10)
        zf.writestr("custom/extra.py", "y = 2\n")
    _keep(kit / "workspace", "job-1", buffer.getvalue())
    assert main(["--kit", str(kit), "job-1", "--against", "job-0"]) == 0
    out = capsys.readouterr().out
    diff = out[:out.index("\n\njob job-1")]
    assert diff.splitlines() == [
        "changes from the code of job job-0 to this one:", "added: custom/extra.py", "removed: custom/helper.py",
        "--- a/custom/learner.py", "+++ b/custom/learner.py", "@@ -1,2 +1,3 @@", " lr = 0.1", " epochs = 2",
        "+import socket  # new",
        "changed: custom/weights.bin (sha256 " + hashlib.sha256(b"\x00\xff" * 10).hexdigest()[:16] + "... -> "
        + hashlib.sha256(b"\x01\xff" * 10).hexdigest()[:16] + "..., not shown: binary or over 1 MiB)"]
    assert main(["--kit", str(kit), "job-1", "--against", "job-9"]) == 1
    assert "job 'job-9' neither ran on this site" in capsys.readouterr().err
