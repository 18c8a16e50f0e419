"""The `fedkit` CLI: results on stdout, one error line on stderr, exit 2 for bad input and 1 for failures,
a traceback only with --debug."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from provision.certs import create_ca
from provision.cli import app

from .conftest import EXAMPLE, NOW
from .test_project import BAD_CASES

runner = CliRunner()


def fedkit(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def project_file(tmp_path: Path) -> Path:
    path = tmp_path / "project.yml"
    shutil.copy(EXAMPLE, path)
    return path


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("command", [["provision"], ["provision", "add-site", "site-1"], ["provision", "revoke", "x"]])
def test_bad_project_yml_is_one_line_and_exit_2(tmp_path: Path, command: list[str], text: str, expected: str) -> None:
    path = tmp_path / "project.yml"
    path.write_text(text)
    result = fedkit(*command, "-p", str(path), "-w", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert result.stderr == expected.replace("project.yml", str(path), 1) + "\n"
    assert result.stdout == ""
    assert not (tmp_path / "ws").exists()


def test_missing_project_file(tmp_path: Path) -> None:
    result = fedkit("provision", "-p", str(tmp_path / "none.yml"), "-w", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'none.yml'}: cannot read (No such file or directory)\n"


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "project.yml"
    path.write_text("")
    result = fedkit("--debug", "provision", "-p", str(path), "-w", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.endswith(f"{path}: empty; start from project.yml.example\n")


def test_provision_add_site_and_revoke_end_to_end(tmp_path: Path, project_file: Path) -> None:
    ws = tmp_path / "ws"
    first = fedkit("provision", "-p", str(project_file), "-w", str(ws))
    assert first.exit_code == 0, first.stderr
    assert f"study CA: {ws}/example-study/state/rootCA.pem (created)" in first.stdout
    assert f"{ws}/example-study/prod_01/site-3.zip" in first.stdout
    assert first.stderr == ""

    second = fedkit("provision", "-p", str(project_file), "-w", str(ws))
    assert "(reused)" in second.stdout and "prod_02" in second.stdout

    project_file.write_text(project_file.read_text() + "  - type: client\n    name: site-4\n    org: hospital-d\n")
    added = fedkit("provision", "add-site", "site-4", "-p", str(project_file), "-w", str(ws))
    assert added.exit_code == 0, added.stderr
    assert f"{ws}/example-study/prod_02/site-4.zip" in added.stdout
    assert sorted(p.name for p in (ws / "example-study").iterdir()) == ["prod_01", "prod_02", "state"]

    revoked = fedkit("provision", "revoke", "site-4", "-p", str(project_file), "-w", str(ws))
    assert revoked.exit_code == 0, revoked.stderr
    assert f"CRL written to {ws}/example-study/crl.pem" in revoked.stdout
    assert "local/crl.pem" in revoked.stdout

    unknown = fedkit("provision", "revoke", "site-9", "-p", str(project_file), "-w", str(ws))
    assert unknown.exit_code == 1
    assert unknown.stderr.count("\n") == 1 and "no certificate was issued to 'site-9'" in unknown.stderr

    not_listed = fedkit("provision", "add-site", "site-9", "-p", str(project_file), "-w", str(ws))
    assert not_listed.exit_code == 2
    assert not_listed.stderr.startswith(f"{project_file}: no participant named 'site-9'")


def test_add_site_refuses_a_site_whose_container_name_an_existing_site_has(tmp_path: Path, project_file: Path) -> None:
    ws = tmp_path / "ws"
    assert fedkit("provision", "-p", str(project_file), "-w", str(ws)).exit_code == 0
    # site_3 would get site-3's container (fedkit-example-study-site-3) on a Docker host running both kits
    project_file.write_text(project_file.read_text() + "  - type: client\n    name: site_3\n    org: hospital-d\n")
    added = fedkit("provision", "add-site", "site_3", "-p", str(project_file), "-w", str(ws))
    assert added.exit_code == 2
    assert added.stderr == (
        f"{project_file}: participants[6] (site_3): 'site_3' and 'site-3' (participants[3]) would share the Docker "
        "container name 'fedkit-example-study-site-3'; rename one of them\n"
    )
    assert not list(ws.glob("example-study/prod_*/site_3*"))


def test_verify_kit_ok_and_per_file_report(provisioned, kit_copy, tmp_path: Path) -> None:
    ok = fedkit("verify-kit", str(provisioned.kit("site-1")))
    assert ok.exit_code == 0
    assert ok.stdout.startswith(f"{provisioned.kit('site-1')}: ok (")

    listing = fedkit("verify-kit", "--all", str(provisioned.kit("site-1")))
    assert "ok       startup/client.crt" in listing.stdout.splitlines()

    kit = kit_copy("site-1")
    (kit / "readme.txt").write_text("changed")
    (kit / "startup" / "fed_client.json").unlink()
    (kit / "startup" / "extra").write_text("")
    bad = fedkit("verify-kit", str(kit))
    assert bad.exit_code == 1
    assert bad.stdout.splitlines() == [
        f"{kit}/readme.txt: changed since the kit was signed",
        f"{kit}/startup/extra: extra (not listed in signature.json)",
        f"{kit}/startup/fed_client.json: missing (listed in signature.json)",
    ]


def test_verify_kit_against_another_ca_fails(provisioned, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(create_ca("other", NOW, 30).cert_pem)
    result = fedkit("verify-kit", str(provisioned.kit("site-1")), "--ca", str(other))
    assert result.exit_code == 1
    assert result.stdout == (
        f"{provisioned.kit('site-1')}/startup/signature.json: signature does not verify against the given root CA\n"
    )
    study_ca = provisioned.study_dir / "state" / "rootCA.pem"
    assert fedkit("verify-kit", str(provisioned.kit("site-1")), "--ca", str(study_ca)).exit_code == 0


def test_verify_kit_bad_arguments_exit_2(tmp_path: Path, provisioned) -> None:
    missing = fedkit("verify-kit", str(tmp_path / "nope"))
    assert (
        missing.exit_code == 2
        and missing.stderr == f"{tmp_path / 'nope'}: not a folder; pass the unzipped kit's top folder\n"
    )
    no_ca = fedkit("verify-kit", str(provisioned.kit("site-1")), "--ca", str(tmp_path / "ca.pem"))
    assert no_ca.exit_code == 2 and no_ca.stderr == f"{tmp_path / 'ca.pem'}: cannot read (No such file or directory)\n"


def test_an_os_error_is_one_line_and_exit_1(tmp_path: Path, project_file: Path) -> None:
    blocker = tmp_path / "ws"
    blocker.write_text("a file where the workspace folder should be")
    result = fedkit("provision", "-p", str(project_file), "-w", str(blocker))
    assert result.exit_code == 1
    assert result.stderr == f"{blocker}/example-study/state: Not a directory\n"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "fedkit"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for command in ("provision", "verify-kit"):
        assert command in done.stdout


def test_a_provision_stopped_by_sigterm_leaves_no_half_written_kits(tmp_path: Path) -> None:
    # `timeout` or a service manager stops with SIGTERM: Python's default died on the spot, leaving
    # thousands of files of a prod_NN that no ledger lists; now it cleans up as on Ctrl-C
    import signal
    import time

    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())
    others = [p for p in data["participants"] if p["type"] != "client"]
    data["participants"] = others + [{"type": "client", "name": f"site-{i}", "org": "h"} for i in range(300)]
    (tmp_path / "project.yml").write_text(yaml.safe_dump(data))
    study = tmp_path / "ws" / data["name"]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedkit"), "provision", "-p",
                             str(tmp_path / "project.yml"), "-w", str(tmp_path / "ws")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (study / "prod_01").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in study.iterdir()) == ["state"]  # the CA stays: later runs must reuse it
    assert not (study / "state" / "issued.json").exists()


def test_study_options_before_a_subcommand_choose_the_study(tmp_path: Path, project_file: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # `fedkit provision -p X -w Y revoke NAME` (the bare command's order) acted on ./project.yml and ./workspace,
    # another study's perhaps, and a revoke cannot be undone
    production = tmp_path / "production"
    production.mkdir()
    shutil.copy(project_file, production / "project.yml")
    monkeypatch.chdir(production)
    assert fedkit("provision").exit_code == 0  # ./project.yml into ./workspace: the study not to touch
    ws = tmp_path / "ws"
    assert fedkit("provision", "-p", str(project_file), "-w", str(ws)).exit_code == 0

    revoked = fedkit("provision", "-p", str(project_file), "-w", str(ws), "revoke", "site-1")

    assert revoked.exit_code == 0, revoked.stderr
    assert f"CRL written to {ws}/example-study/crl.pem" in revoked.stdout
    assert not (production / "workspace" / "example-study" / "crl.pem").exists()
    both = fedkit("provision", "-w", str(ws), "revoke", "site-2", "-w", str(tmp_path / "other"))
    assert both.exit_code == 2 and "--workspace given twice" in both.stderr


def _not_after(pem: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(pem.read_bytes()).not_valid_after_utc


def test_provision_says_when_the_kits_end_and_the_ca_outlives_them(tmp_path: Path, project_file: Path) -> None:
    ws = tmp_path / "ws"
    done = fedkit("provision", "-p", str(project_file), "-w", str(ws))
    assert done.exit_code == 0, done.stderr
    ca_end = _not_after(ws / "example-study/state/rootCA.pem")
    kit_end = _not_after(ws / "example-study/prod_01/site-1/startup/client.crt")
    # kits renewed a year on, under the same CA (the one every site pinned), still get their full year
    assert ca_end - kit_end > dt.timedelta(days=4 * 365)
    assert (f"Certificates valid until {kit_end:%Y-%m-%d} (the study CA until {ca_end:%Y-%m-%d})"
            in done.stdout)
    assert "Note:" not in done.stdout


def test_provision_warns_when_the_ca_cuts_the_kits_short(tmp_path: Path, project_file: Path) -> None:
    ws = tmp_path / "ws"
    project_file.write_text(project_file.read_text().replace("cert_validity_days: 360",
                                                             "cert_validity_days: 360\nca_validity_days: 100"))
    done = fedkit("provision", "-p", str(project_file), "-w", str(ws))
    assert done.exit_code == 0, done.stderr
    ca_end = _not_after(ws / "example-study/state/rootCA.pem")
    assert _not_after(ws / "example-study/prod_01/site-1/startup/client.crt") == ca_end
    assert f"Note: they end with the study CA, sooner than cert_validity_days asks; before {ca_end:%Y-%m-%d}" \
        in " ".join(done.stdout.split())


def test_renewing_kits_never_lets_a_revoked_participant_back_in_by_accident(tmp_path: Path,
                                                                          project_file: Path) -> None:
    # a routine `fedkit provision` (renewing every kit) issued the revoked site-2 a new certificate whose
    # serial no CRL listed: it rejoined the study and sent updates
    ws = tmp_path / "ws"
    assert fedkit("provision", "-p", str(project_file), "-w", str(ws)).exit_code == 0
    assert fedkit("provision", "revoke", "site-2", "-p", str(project_file), "-w", str(ws)).exit_code == 0
    expected = ("project.yml lists site-2, whose certificates were revoked: a new kit would let it back in. "
                "Remove site-2 from project.yml, or issue a new kit on purpose (a lost or stolen kit replaced) "
                "with --reinstate site-2")
    for args in (["provision"], ["provision", "add-site", "site-2"]):
        refused = fedkit(*args, "-p", str(project_file), "-w", str(ws))
        assert refused.exit_code == 2 and refused.stderr.strip() == expected, refused.stderr
    assert sorted(p.name for p in (ws / "example-study").iterdir()) == ["crl.pem", "prod_01", "state"]

    reinstated = fedkit("provision", "-p", str(project_file), "-w", str(ws), "--reinstate", "site-2")
    assert reinstated.exit_code == 0, reinstated.stderr
    assert (ws / "example-study" / "prod_02" / "site-2.zip").exists()
    again = fedkit("provision", "-p", str(project_file), "-w", str(ws))  # it holds a live certificate now
    assert again.exit_code == 0, again.stderr
