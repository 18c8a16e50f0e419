"""A study run the Docker way, over a private engine: the server and two sites each started with their
kit's startup/docker.sh (image built from the kit), the demo job submitted with the admin kit's docker.sh,
a second start of a running site refused, a tampered kit refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.demo_data import write_demo_data
from provision.local_study import LocalStudy, wait_until
from runtime.kitsig import CA_PIN_PATH
from tests.conftest import EXAMPLE_PROJECT, JOB_TEMPLATE, with_sites
from tests.docker_support import BASE_IMAGE, Engine, ensure_wheels

# a cold run builds the images (torch from wheels) and may debootstrap the base image first
pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

SITES = ["site-1", "site-2"]
# The kits belong to an ordinary account: docker.sh runs its containers as the kit's owner, never root.
KIT_OWNER = (12345, 12345)
BUILD_TIMEOUT_S = 1500.0   # a cold build installs torch from wheels; the machine is shared and slow


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class DockerStudy:
    """A provisioned study whose participants run through their own docker.sh on the private engine."""

    def __init__(self, engine: Engine, study: LocalStudy, researcher_dir: Path, env: dict[str, str]):
        self.engine = engine
        self.study = study
        self.researcher_dir = researcher_dir
        self.env = env
        self.timings: dict[str, float] = {}

    def container(self, name: str) -> str:
        return f"fedkit-{self.study.project_name}-{name}".lower().replace("@", "-").replace(".", "-")

    def docker_sh(self, name: str, *args: str, timeout_s: float = BUILD_TIMEOUT_S,
                  cwd: Path | None = None) -> subprocess.CompletedProcess:
        script = self.study.kits[name] / "startup" / "docker.sh"
        return subprocess.run(["bash", str(script), *args], env=self.env, cwd=cwd or self.researcher_dir,
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)

    def admin_json(self, command: str, timeout_s: float = 300.0) -> object:
        done = self.docker_sh(self.study.admins[0], "-c", command, "--json", timeout_s=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"admin '{command}' exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout)

    def online_sites(self) -> set[str]:
        status = self.admin_json("check_status client")
        return {s["site"] for s in status["sites"] if s["online"]}

    def logs(self, name: str) -> str:
        done = self.engine.docker("logs", "--tail", "40", self.container(name), check=False)
        return (done.stdout + done.stderr).decode(errors="replace")

    def remove_all(self) -> None:
        for name in [self.study.server, *self.study.clients]:
            self.engine.docker("rm", "-f", self.container(name), check=False)


@pytest.fixture
def docker_study(docker_engine: Engine, tmp_path: Path):
    study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / "study", edit=with_sites(SITES))
    data = write_demo_data(tmp_path / "study" / "data", SITES)
    study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": 6.0})
    for site in SITES:
        study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]), "heartbeat_interval_s": 1.0})
    researcher = tmp_path / "researcher"
    shutil.copytree(JOB_TEMPLATE, researcher / "tabular_classifier")
    for path in (tmp_path / "study" / "kits", researcher):
        _chown_tree(path, *KIT_OWNER)
    wheels = ensure_wheels(*(kit / "requirements.txt" for kit in study.kits.values()))
    env = {k: v for k, v in docker_engine.env().items() if k not in ("PYTHONPATH", "FEDKIT_IMAGE")}
    # offline build from the bookworm base and the wheel cache; this Python checks kit signatures on the host
    env.update(FEDKIT_BASE_IMAGE=BASE_IMAGE, FEDKIT_WHEELS=str(wheels), FEDKIT_PYTHON=sys.executable)
    handle = DockerStudy(docker_engine, study, researcher, env)
    yield handle
    handle.remove_all()


def test_study_runs_from_docker_sh(docker_study: DockerStudy) -> None:
    ds, study = docker_study, docker_study.study

    t0 = time.monotonic()
    started = ds.docker_sh(study.server)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "docker logs -f" in started.stdout  # it says where the logs are
    wait_until(lambda: _listening(study.fed_learn_port) and _listening(study.admin_port), 120,
               f"the server container to listen\n{ds.logs(study.server)}", interval_s=0.5)
    ds.timings["server: docker.sh to listening"] = time.monotonic() - t0

    t0 = time.monotonic()
    # site-2's host has no Python: its kit is checked in a throw-away container, and its first start (no
    # local/ca.sha256 yet) pins the study CA inside its own container (the throw-away one sees the kit read-only)
    (study.kits["site-2"] / CA_PIN_PATH).unlink()
    for site in SITES:
        host_python = ds.env["FEDKIT_PYTHON"]
        ds.env["FEDKIT_PYTHON"] = "/nonexistent/python3" if site == "site-2" else host_python
        started = ds.docker_sh(site)
        ds.env["FEDKIT_PYTHON"] = host_python
        assert started.returncode == 0, started.stderr[-3000:]
        ds.timings[f"sites: {site}'s docker.sh returned"] = time.monotonic() - t0
    server_log = study.kits[study.server] / "workspace" / "log.txt"
    wait_until(lambda: all(f"site {s} (org-{s}) registered" in server_log.read_text() for s in SITES), 180,
               "both sites registered in the server log", interval_s=0.5)
    ds.timings["sites: first docker.sh to both registered (server log)"] = time.monotonic() - t0
    wait_until(lambda: ds.online_sites() == set(SITES), BUILD_TIMEOUT_S, "both sites online", interval_s=1.0)
    pins = {site: (study.kits[site] / CA_PIN_PATH).read_text().strip() for site in SITES}
    assert pins["site-2"] == pins["site-1"], "site-2's first start pinned the study CA in its own container"

    # the site runs as the kit's owner, with the engine's socket and FEDKIT_IN_DOCKER for job sandboxes
    inspected = json.loads(ds.engine.docker("container", "inspect", ds.container("site-1")).stdout)[0]
    assert inspected["Config"]["User"] == f"{KIT_OWNER[0]}:{KIT_OWNER[1]}"
    assert "FEDKIT_IN_DOCKER=1" in inspected["Config"]["Env"]
    assert inspected["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert inspected["HostConfig"]["NetworkMode"] == "host"
    data_mount = next(m for m in inspected["Mounts"] if m["Destination"].endswith("/data/site-1"))
    assert data_mount["RW"] is False and data_mount["Source"] == data_mount["Destination"]

    # a second start of a running site is refused, and the first one keeps running
    again = ds.docker_sh("site-1")
    assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr

    record = ds.admin_json("submit_job tabular_classifier --set server.rounds=2")
    final = ds.admin_json(f"wait_job {record['job_id']} 400", timeout_s=500)
    assert final["state"] == "finished", final
    assert final["rounds_done"] == 2
    for site in SITES:
        log = (study.kits[site] / "workspace" / "log.txt").read_text()
        assert record["job_id"] in log
        # a site in a container runs job code in a sibling container of its own, without network
        started = [json.loads(line) for line in (study.kits[site] / "workspace" / "audit.jsonl").read_text()
                   .splitlines() if '"worker_started"' in line]
        assert started and all(r["backend"] == "docker" for r in started), started

    # a kit whose files differ from what the CA signed does not start, not even its container
    ds.engine.docker("stop", ds.container("site-2"))
    with (study.kits["site-2"] / "runtime" / "client" / "daemon.py").open("a") as f:
        f.write("\n# tampered\n")
    refused = ds.docker_sh("site-2")
    assert refused.returncode == 1
    assert "refusing to start" in refused.stderr and "runtime/client/daemon.py" in refused.stderr
    # ... also on a host without a Python of its own: the check then runs in a throw-away container
    ds.env["FEDKIT_PYTHON"] = "/nonexistent/python3"
    refused = ds.docker_sh("site-2")
    assert refused.returncode == 1
    assert "refusing to start" in refused.stderr and "runtime/client/daemon.py" in refused.stderr
    state = ds.engine.docker("container", "inspect", "--format", "{{.State.Status}}", ds.container("site-2"))
    assert state.stdout.decode().strip() == "exited"

    # a kit owned by root is refused: its container would run as root
    ds.engine.docker("stop", ds.container(study.server))
    _chown_tree(study.kits[study.server], 0, 0)
    refused = ds.docker_sh(study.server)
    assert refused.returncode == 1 and "owned by root" in refused.stderr

    for what, seconds in ds.timings.items():
        print(f"[docker timing] {what}: {seconds:.1f} s")
