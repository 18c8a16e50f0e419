"""Who may reach the admin port: only admin certificates of this study's CA. An admin kit of another
study, aimed at our server, and a site's (client) certificate used as an admin's, are both refused before
any command runs, and the console says so in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from provision.local_study import LocalStudy

from ..conftest import EXAMPLE_PROJECT, REPO, with_sites

ADMIN = "admin@study.org"


def _foreign_study(ours: LocalStudy, root: Path) -> LocalStudy:
    """The example study provisioned again (a new CA, the same admin names), pointed at our server."""

    def same_server(data: dict[str, Any]) -> None:
        with_sites(["site-1"])(data)
        server = next(p for p in data["participants"] if p["type"] == "server")
        server["fed_learn_port"], server["admin_port"] = ours.fed_learn_port, ours.admin_port

    return LocalStudy.create(EXAMPLE_PROJECT, root, free_ports=False, edit=same_server)


def _hand_made_kit(root: Path, ours: LocalStudy, cert_dir: Path, cert: str, key: str) -> Path:
    """An admin kit folder holding someone else's cert and key, but trusting our CA: so the server, not
    the console, is the one that has to refuse. Unsigned, so it runs through `python -m runtime.admin`."""
    startup = root / "startup"
    startup.mkdir(parents=True)
    ours_startup = ours.kits[ADMIN] / "startup"
    shutil.copy(cert_dir / cert, startup / "client.crt")
    shutil.copy(cert_dir / key, startup / "client.key")
    shutil.copy(ours_startup / "rootCA.pem", startup / "rootCA.pem")
    (startup / "fed_admin.json").write_text((ours_startup / "fed_admin.json").read_text())
    return root


def _console(study: LocalStudy, kit: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([study.python, "-m", "runtime.admin", "--kit", str(kit), "-c", command, "--json"],
                          capture_output=True, text=True, cwd=REPO, env=study.env(), timeout=60)


def _assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    line = done.stderr.strip()
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"error": line.removeprefix("fl_admin: "), "exit_code": 1}
    assert line.startswith("fl_admin: ") and "\n" not in line, line  # one line, no gRPC log noise
    assert all(w in line for w in words), line


def _admin_records(study: LocalStudy) -> list[dict[str, Any]]:
    audit = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == "admin_command"]


def test_admin_kit_from_another_ca_is_refused(make_study, tmp_path):
    ours = make_study(sites=["site-1"]).study
    ours.start_server()
    foreign = _foreign_study(ours, tmp_path / "foreign")

    # the foreign kit as its admin would run it: it neither trusts our server nor is trusted by it
    # (in words: gRPC's own line was "TLS handshake ... failed: CERTIFICATE_VERIFY_FAILED")
    _assert_refused(foreign.admin("list_jobs", admin=ADMIN), "presents a certificate this kit's study CA did "
                    "not issue", "same study")
    # the foreign admin cert with our CA as trust anchor: now only the server's check stands in the way
    kit = _hand_made_kit(tmp_path / "mixed", ours, foreign.kits[ADMIN] / "startup", "client.crt", "client.key")
    _assert_refused(_console(ours, kit, "list_jobs"), "refused this admin kit's certificate", "another study")

    assert _admin_records(ours) == [], "no command ran for a foreign certificate"
    assert ours.admin_json("list_jobs", admin=ADMIN) == []  # our own admin, same name, still gets in


def test_client_certificate_is_refused_on_the_admin_port(make_study, tmp_path):
    ours = make_study(sites=["site-1"]).study
    ours.start_server()
    site_startup = ours.kits["site-1"] / "startup"
    kit = _hand_made_kit(tmp_path / "site-as-admin", ours, site_startup, "client.crt", "client.key")

    _assert_refused(_console(ours, kit, "list_jobs"), "refused our certificate", "'site-1'", "admin port")
    assert _admin_records(ours) == []
