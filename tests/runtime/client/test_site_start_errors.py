"""A site that cannot start says why in its workspace log as well as on stderr: started from the admin console
(`restart client SITE`), it starts again through its kit's start.sh where nobody reads stderr, and site IT
looks in workspace/log.txt. Stderr keeps its one line and the exit code stays 1. Real kits, started by their
own start.sh (tests/e2e/test_site_refusal_audit.py covers the restart from the console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provision.local_study import LocalStudy

REPO = Path(__file__).resolve().parents[3]
BAD_PRIVACY = {"gaussian_dp": {"noise_multiplier": 1.0, "clip": 1.0}}  # `clip`: the field is clip_norm


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> LocalStudy:
    return LocalStudy.create(REPO / "project.yml.example", tmp_path_factory.mktemp("study"))


def _start(kit: Path) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "FEDKIT_PYTHON": sys.executable}
    return subprocess.run(["bash", str(kit / "startup" / "start.sh")], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


@pytest.mark.parametrize("file, settings, says", [
    ("privacy.yml", BAD_PRIVACY, "privacy.yml"),
    ("job_policy.yml", {"allowed_roles": ["janitor"]}, "job_policy.yml"),
    ("site.yml", {"heartbeat_interval_s": "often"}, "site.yml"),
])
def test_a_bad_local_file_at_start_is_in_the_workspace_log(study: LocalStudy, file: str, settings: dict,
                                                           says: str) -> None:
    site = study.clients[0]
    kit = study.kits[site]
    for name in ("privacy.yml", "job_policy.yml", "site.yml"):
        (kit / "local" / name).unlink(missing_ok=True)
    study.write_local(site, file, settings)

    done = _start(kit)

    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()  # stderr: the one line, as before
    assert line.startswith("fedkit client: ") and says in line
    reason = line.removeprefix("fedkit client: ")
    last = (kit / "workspace" / "log.txt").read_text().strip().splitlines()[-1]
    assert last.endswith(f" ERROR fedkit.client: site cannot start: {reason}"), last
    assert not (kit / "workspace" / "daemon.pid").exists()


def test_a_wrong_kit_folder_is_refused_without_creating_one(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-kit"
    done = subprocess.run([sys.executable, "-m", "runtime.client", "--kit", str(nowhere)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fedkit client: ") and "cannot read" in line
    assert not nowhere.exists()


@pytest.mark.parametrize("where", ["study", "kit", "root"])
def test_a_data_root_that_holds_the_kit_is_refused(study: LocalStudy, where: str) -> None:
    """Every job reads its data root: one above the kit would show it other kits' keys and the CA's state."""
    site = study.clients[0]
    kit = study.kits[site]
    for name in ("privacy.yml", "job_policy.yml", "site.yml"):
        (kit / "local" / name).unlink(missing_ok=True)
    data_root = {"study": study.root, "kit": kit, "root": Path("/")}[where]
    study.write_local(site, "site.yml", {"data_root": str(data_root)})

    done = _start(kit)

    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (f"fedkit client: local/site.yml: data_root {data_root} holds this kit ({kit.resolve()}): every "
                    "job reads all of it, keys of other kits included; give the folder that holds only this "
                    "site's data")
