"""Trust anchors over real processes: a server whose certificate lead IT revoked is refused by sites and
consoles; deleting the server's crl.pem un-revokes nobody (the running server keeps the list, a restart
refuses to go on without it); a kit re-signed by a foreign CA no longer starts once the real CA is pinned;
a private key others can read stops a site before it connects; and what the runtime writes is private."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from provision import revoke
from provision.local_study import LocalStudy, wait_until
from provision.state import StudyWorkspace

from ..provision.test_ca_pinning import re_sign_with_foreign_ca


def _revoke_and_install(study: LocalStudy, name: str) -> Path:
    """Lead IT revokes `name`; the server's site IT copies the CRL to the server kit's local/crl.pem."""
    result = revoke(StudyWorkspace.for_study(study.root / "workspace", study.project_name), name,
                    dt.datetime.now(dt.UTC))
    target = study.kits[study.server] / "local" / "crl.pem"
    shutil.copy(result.published_crl_path, target)
    return target


def _audit(study: LocalStudy, name: str) -> list[dict[str, Any]]:
    path = study.kits[name] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _one_line_refusal(done: subprocess.CompletedProcess, *words: str) -> str:
    line = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in line, done.stderr
    assert all(w in line for w in words), line
    return line


def test_a_server_whose_certificate_is_revoked_is_refused_by_sites_and_consoles(make_study):
    study = make_study(sites=["site-1"]).study
    _revoke_and_install(study, study.server)
    study.start_server()
    study.start("site-1")

    wait_until(lambda: "certificate" in study.log_tail("site-1") and "is revoked" in study.log_tail("site-1"), 90,
               "site-1 to refuse the revoked server")
    _one_line_refusal(study.admin("list_jobs"), "fl_admin:", "certificate", "is revoked", "tell lead IT")

    events = [r["event"] for r in _audit(study, study.server)]
    assert "site_registered" not in events and "admin_command" not in events


def test_deleting_the_crl_unrevokes_nobody(make_study):
    study = make_study(sites=["site-1", "site-2"]).study
    crl = _revoke_and_install(study, "site-2")
    study.start_server()
    study.start("site-1")
    wait_until(lambda: any(r["event"] == "site_registered" for r in _audit(study, study.server)), 90,
               "site-1 to register")

    crl.unlink()  # by mistake, or by someone who wants site-2 back in
    study.start("site-2")
    wait_until(lambda: any(r["event"] == "peer_refused" and "'site-2' has been revoked" in r["reason"]
                           for r in _audit(study, study.server)), 90, "the server to refuse site-2")
    refused = [r for r in _audit(study, study.server) if r["event"] == "crl_refused"]
    assert len(refused) == 1 and "deleted; still enforcing CRL number" in refused[0]["reason"]
    # the list the server keeps is still the one it serves: site-1 and the console carry on
    status = study.admin_json("check_status client")
    assert [s["site"] for s in status["sites"] if s["online"]] == ["site-1"]

    study.stop("site-2")
    study.stop(study.server)
    proc = study.start(study.server)
    assert proc.wait(60) == 1
    assert "crl.pem: missing, but this server has enforced CRL number" in study.log_tail(study.server)

    # what the runtime wrote is owner-only: workspace 0700, every file in it 0600
    for name in (study.server, "site-1"):
        ws = study.kits[name] / "workspace"
        assert stat.S_IMODE(ws.stat().st_mode) == 0o700
        shared = [p for p in ws.rglob("*") if stat.S_IMODE(p.stat().st_mode) & 0o077]
        assert shared == [], f"{name}: readable by group or others: {shared}"


def test_a_kit_re_signed_by_a_foreign_ca_is_refused_once_the_real_ca_is_pinned(make_study):
    study = make_study(sites=["site-1"]).study
    kit = study.kits["site-1"]
    (kit / "local" / "ca.sha256").unlink()  # this site IT did not pre-seed the pin
    study.start("site-1")  # the first start pins the study CA (no server needed for that)
    wait_until(lambda: "compare it with the fingerprint lead IT gave you" in study.log_tail("site-1"), 60,
               "the first start to pin the CA and say so")
    assert (kit / "local" / "ca.sha256").read_text().count(":") == 31
    study.stop("site-1")

    re_sign_with_foreign_ca(kit)
    done = subprocess.run(["bash", str(kit / "startup" / "start.sh")], capture_output=True, text=True,
                          env=study.env(), timeout=60)
    assert done.returncode == 1
    assert "local/ca.sha256" in done.stderr and "refusing a kit signed by another CA" in done.stderr
    assert not (kit / "workspace" / "daemon.pid").exists()


def test_a_private_key_others_can_read_stops_the_site_with_the_fix(make_study):
    study = make_study(sites=["site-1"]).study
    key = study.kits["site-1"] / "startup" / "client.key"
    key.chmod(0o644)
    done = subprocess.run(["bash", str(study.kits["site-1"] / "startup" / "start.sh")], capture_output=True,
                          text=True, env=study.env(), timeout=60)
    assert done.returncode == 1
    assert f"chmod 600 {key.resolve()}" in done.stderr
    assert not (study.kits["site-1"] / "workspace" / "daemon.pid").exists()
