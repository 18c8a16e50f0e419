"""`fedkit demo`, the README's main command: a whole study from real kits, and nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO


def test_demo_runs_a_study_and_leaves_no_files_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    done = subprocess.run([sys.executable, "-m", "provision.cli", "demo", "--rounds", "2"], cwd=REPO,
                          env={**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished" in done.stdout and "best model" in done.stdout
    assert list(scratch.iterdir()) == [], "the demo left files (private keys among them) in the temp folder"
