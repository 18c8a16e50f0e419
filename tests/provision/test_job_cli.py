"""`fedkit job hash FOLDER`: the hash the console signs and sites approve; one line on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from provision.cli import EXIT_BAD_INPUT, app
from runtime.job_code import code_hash_of_zip
from runtime.job_spec import zip_folder

JOB = Path(__file__).resolve().parents[2] / "templates" / "jobs" / "tabular_classifier"


def test_job_hash_prints_the_code_hash(tmp_path: Path) -> None:
    job = shutil.copytree(JOB, tmp_path / "job")
    result = CliRunner().invoke(app, ["job", "hash", str(job)])
    assert result.exit_code == 0
    digest, _, folder = result.stdout.strip().partition("  ")
    assert digest == code_hash_of_zip(zip_folder(job)) and folder == str(job)
    (job / "custom" / "learner.py").write_text("# changed\n")
    assert CliRunner().invoke(app, ["job", "hash", str(job)]).stdout.split()[0] != digest


def test_job_hash_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["job", "hash", str(tmp_path / "nope")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.strip() == f"{tmp_path / 'nope'}: not a job folder"
