"""A site that cannot talk to the server says why, in one line a site's IT can act on, and with --once
stops with exit code 1 instead of retrying for ever: a kit of another study, a certificate the server
refuses at the handshake, and a revoked site, each over real processes and real TLS."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys

from provision import revoke
from provision.local_study import LocalStudy, wait_until
from provision.state import StudyWorkspace

from ..conftest import EXAMPLE_PROJECT, with_sites


def _foreign_study(ours: LocalStudy, root) -> LocalStudy:
    """Another study (its own CA) whose kits dial our server's ports."""
    def same_server(data):
        with_sites(["site-1"])(data)
        server = next(p for p in data["participants"] if p["type"] == "server")
        server["fed_learn_port"], server["admin_port"] = ours.fed_learn_port, ours.admin_port
    return LocalStudy.create(EXAMPLE_PROJECT, root, free_ports=False, edit=same_server)


def _start_once(study: LocalStudy, site: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(study.kits[site] / "startup" / "start.sh"), "--once"], capture_output=True,
                          text=True, env=study.env(), timeout=180, stdin=subprocess.DEVNULL)


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_a_kit_of_another_study_is_told_so_and_stops(make_study, tmp_path):
    ours = make_study(sites=["site-1"]).study
    ours.start_server()
    foreign = _foreign_study(ours, tmp_path / "foreign")

    done = _start_once(foreign, "site-1")

    assert done.returncode == 1
    line = _last_line(done)
    assert "certificate this kit's study CA did not issue" in line and "another study" in line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "Handshake failed" not in done.stderr, "gRPC core's own lines, beside the one that says it all"
    # the server, for its part, logs the refusal with a reason too, not a TLS error code
    wait_until(lambda: "the peer broke off the handshake (a kit of another study?)" in ours.log_tail(ours.server),
               30, "the server to log the refusal")


def test_a_certificate_the_server_refuses_at_the_handshake_is_told_so_and_stops(make_study, tmp_path):
    ours = make_study(sites=["site-1"]).study
    ours.start_server()
    foreign = _foreign_study(ours, tmp_path / "foreign")
    kit = ours.kits["site-1"]
    for name in ("client.crt", "client.key"):  # our CA to check the server, another study's certificate
        shutil.copy(foreign.kits["site-1"] / "startup" / name, kit / "startup" / name)
    # run the daemon itself: start.sh would (rightly) refuse a kit whose files changed
    done = subprocess.run([sys.executable, "-m", "runtime.client", "--kit", str(kit), "--once"], capture_output=True,
                          text=True, env={**ours.env(), "PYTHONPATH": str(kit)}, timeout=180,
                          stdin=subprocess.DEVNULL, cwd=kit)

    assert done.returncode == 1
    line = _last_line(done)
    assert "refused this site's certificate" in line and "ask lead IT for a new kit" in line, done.stderr[-2000:]


def test_a_revoked_site_is_told_so_and_stops(make_study):
    study = make_study(sites=["site-1"]).study
    result = revoke(StudyWorkspace.for_study(study.root / "workspace", study.project_name), "site-1",
                    dt.datetime.now(dt.UTC))
    shutil.copy(result.published_crl_path, study.kits[study.server] / "local" / "crl.pem")
    study.start_server()

    done = _start_once(study, "site-1")

    assert done.returncode == 1
    line = _last_line(done)
    assert "refused our certificate" in line and "has been revoked" in line, done.stderr[-2000:]
    assert os.path.exists(study.kits["site-1"] / "workspace" / "log.txt")
