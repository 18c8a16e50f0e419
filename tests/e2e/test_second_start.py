"""A kit started a second time while it runs is refused with one line, for the server and for a site: two
servers shared one port (gRPC's SO_REUSEPORT) and rewrote one job store, two daemons of one site threw
each other off the server and tore the audit chain, and the second one's exit removed the pid file
stop.sh needs. Real kits, started by their own start.sh."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from provision.local_study import LocalStudy, wait_until
from runtime.audit import verify


def _start_again(study: LocalStudy, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(study.kits[name] / "startup" / "start.sh")], capture_output=True, text=True,
                          env=study.env(), stdin=subprocess.DEVNULL, timeout=120, check=False)


def _pid_file(study: LocalStudy, name: str) -> Path:
    return study.kits[name] / "workspace" / "daemon.pid"


def test_a_running_kit_started_again_is_refused_and_the_first_keeps_running(make_study) -> None:
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start_sites()
    for name, who in ((study.server, "server"), ("site-1", "site")):
        running = _pid_file(study, name).read_text().strip()

        done = _start_again(study, name)

        assert done.returncode == 1, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert f"the {who} of {study.kits[name]} is already running from this kit (pid {running}" in line, line
        assert "stop.sh" in line
        assert _pid_file(study, name).read_text().strip() == running  # stop.sh still finds the first one
        assert study.procs[name].poll() is None
    assert study.online_sites() == ["site-1"]  # the first server still answers, and the site is still its
    for name in (study.server, "site-1"):
        verify(study.kits[name] / "workspace" / "audit.jsonl")  # raises where a second writer tore the chain


def test_a_copy_of_a_sites_kit_run_elsewhere_is_refused_while_the_first_is_connected(make_study, tmp_path) -> None:
    # the workspace lock holds one folder; a copy of the kit in another folder (or on another machine) has the
    # same certificate and registered beside the first, each throwing the other off the server
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start_sites()
    copy = tmp_path / "elsewhere" / "site-1"
    shutil.copytree(study.kits["site-1"], copy, ignore=shutil.ignore_patterns("workspace"))
    study.kits["site-1 copy"] = copy
    second = study.start("site-1 copy")
    try:
        log = copy / "workspace" / "log.txt"
        wait_until(lambda: log.exists() and "another copy of this site's kit is running" in log.read_text(), 60,
                   "the copy to be refused")
        assert second.poll() is None  # it keeps trying, and takes over once the first stops
        status = study.admin_json("check_status client")["sites"]
        assert [(s["site"], s["online"]) for s in status] == [("site-1", True)]
        audit = [json.loads(line) for line in
                 (study.kits[study.server] / "workspace" / "audit.jsonl").read_text().splitlines()]
        assert [r["event"] for r in audit].count("site_copy_refused") == 1  # once, not at each of its retries
        registered = [r for r in audit if r["event"] == "site_registered"]
        assert len(registered) == 1

        study.stop("site-1")
        wait_until(lambda: "registered with" in log.read_text(), 60, "the copy to register once the first stopped")
    finally:
        study.stop("site-1 copy")
