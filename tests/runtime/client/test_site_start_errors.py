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


def _start_with_data_root(study: LocalStudy, data_root: str, env: dict[str, str] | None = None) -> str:
    site = study.clients[0]
    kit = study.kits[site]
    for name in ("privacy.yml", "job_policy.yml", "site.yml"):
        (kit / "local" / name).unlink(missing_ok=True)
    study.write_local(site, "site.yml", {"data_root": data_root})
    done = subprocess.run(["bash", str(kit / "startup" / "start.sh")], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                               "FEDKIT_PYTHON": sys.executable, **(env or {})},
                          stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line.removeprefix("fedkit client: ")


def test_a_data_root_that_is_not_there_is_refused_at_start(study: LocalStudy, tmp_path: Path) -> None:
    # each started, registered, and failed only at the first job, with advice for another fault
    missing = tmp_path / "not-mounted"
    assert _start_with_data_root(study, str(missing)) == (
        f"local/site.yml: data_root {missing} does not exist (not created, or not mounted yet); create or mount it, "
        "or correct the path, and start the site again")
    (tmp_path / "train.csv").write_text("a,b\n")
    assert _start_with_data_root(study, str(tmp_path / "train.csv")) == (
        f"local/site.yml: data_root {tmp_path / 'train.csv'} is a file; give the folder that holds this site's data")
    relative = _start_with_data_root(study, "data/site-1")
    assert "field 'data_root'" in relative and "'data/site-1' is a relative path; give the data folder's full " \
        "path" in relative, relative


def test_a_data_root_under_home_is_the_folder_the_job_reads(study: LocalStudy, tmp_path: Path) -> None:
    # `~/data` passed the start's check (expanded) and the sandbox mounted `~/data` as written: every job refused
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    site = study.clients[0]
    study.write_local(site, "site.yml", {"data_root": "~/data/site-1"})
    env = {**os.environ, "HOME": str(tmp_path)}
    probe = ("import sys; from pathlib import Path; from runtime import kit_config as kc; "
             "print(kc.load_optional(Path(sys.argv[1]), kc.SiteLocalSettings).data_root)")
    done = subprocess.run([sys.executable, "-c", probe, str(study.kits[site] / "local" / "site.yml")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True)
    assert done.stdout.strip() == str(tmp_path / "data" / "site-1")


def test_a_data_root_job_code_cannot_read_is_refused_at_start(study: LocalStudy, tmp_path: Path) -> None:
    private = tmp_path / "private-data"
    private.mkdir()
    if os.geteuid() == 0:  # a root site runs job code as sandbox.run_as (nobody): the site could read it, not jobs
        private.chmod(0o700)
        assert _start_with_data_root(study, str(private)) == (
            f"local/site.yml: data_root {private} cannot be read by the user job code runs as (65534:65534, "
            f"sandbox.run_as); let it read the data (e.g. chgrp -R 65534 {private}; chmod -R g+rX {private}) or set "
            "run_as to a user that may")
    else:
        private.chmod(0o000)
        assert f"data_root {private} cannot be read by this site's user" in _start_with_data_root(study, str(private))
