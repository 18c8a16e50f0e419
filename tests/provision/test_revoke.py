"""Revocation: a CA-signed CRL listing every serial issued to the name, which openssl then enforces."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import subprocess
import zipfile
from pathlib import Path

import pytest
from cryptography import x509

from provision import KitRenderer, Project, provision, revoke
from provision.state import StudyWorkspace, load_ledger
from runtime.errors import CertificateError
from runtime.identity import Kind
from runtime.kitsig import verify_kit

from .conftest import NOW

REVOKED_AT = NOW + dt.timedelta(days=2)
CHECK_AT = NOW + dt.timedelta(days=3)


def openssl_verify_with_crl(study: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        "openssl", "verify", "-attime", str(int(CHECK_AT.timestamp())), "-crl_check",
        "-CAfile", str(study / "state" / "rootCA.pem"), "-CRLfile", str(study / "crl.pem"), str(cert),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def workspace(tmp_path: Path, example_project: Project, renderer: KitRenderer) -> StudyWorkspace:
    provision(example_project, tmp_path, NOW, renderer)
    return StudyWorkspace.for_study(tmp_path, example_project.name)


def cert_at(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_revoke_writes_a_ca_signed_crl_with_the_sites_serial(workspace: StudyWorkspace) -> None:
    result = revoke(workspace, "site-2", REVOKED_AT)
    site_cert = cert_at(workspace.root / "prod_01" / "site-2" / "startup" / "client.crt")
    assert result.newly_revoked == (str(site_cert.serial_number),) and result.already_revoked == ()
    assert result.published_crl_path == workspace.root / "crl.pem"
    assert workspace.crl_path.read_bytes() == workspace.published_crl_path.read_bytes()

    ca = cert_at(workspace.ca_cert_path)
    crl = x509.load_pem_x509_crl(workspace.published_crl_path.read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert [r.serial_number for r in crl] == [site_cert.serial_number]
    assert crl.next_update_utc == ca.not_valid_after_utc
    assert load_ledger(workspace.ledger_path).revoked_serials() == {str(site_cert.serial_number)}


def test_openssl_refuses_the_revoked_site_and_accepts_the_others(workspace: StudyWorkspace) -> None:
    revoke(workspace, "site-2", REVOKED_AT)
    prod = workspace.root / "prod_01"
    revoked = openssl_verify_with_crl(workspace.root, prod / "site-2" / "startup" / "client.crt")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    for kit in ("site-1", "site-3", "admin@study.org"):
        done = openssl_verify_with_crl(workspace.root, prod / kit / "startup" / "client.crt")
        assert done.returncode == 0, done.stdout + done.stderr


def test_revoke_covers_every_run_and_is_safe_to_repeat(
    workspace: StudyWorkspace, example_project: Project, renderer: KitRenderer
) -> None:
    provision(example_project, workspace.root.parent, NOW + dt.timedelta(days=1), renderer)
    serials = {
        str(cert_at(workspace.root / prod / "site-1" / "startup" / "client.crt").serial_number)
        for prod in ("prod_01", "prod_02")
    }
    first = revoke(workspace, "site-1", REVOKED_AT)
    assert set(first.newly_revoked) == serials
    again = revoke(workspace, "site-1", REVOKED_AT + dt.timedelta(hours=1))
    assert again.newly_revoked == () and set(again.already_revoked) == serials
    crl = x509.load_pem_x509_crl(workspace.crl_path.read_bytes())
    assert {str(r.serial_number) for r in crl} == serials
    assert len(load_ledger(workspace.ledger_path).revoked) == 2


def test_revoking_two_names_keeps_both_in_the_crl(workspace: StudyWorkspace) -> None:
    revoke(workspace, "site-1", REVOKED_AT)
    revoke(workspace, "lead@study.org", REVOKED_AT)
    crl = x509.load_pem_x509_crl(workspace.crl_path.read_bytes())
    assert len(list(crl)) == 2


def test_revoking_an_unknown_name_says_who_was_issued(workspace: StudyWorkspace) -> None:
    with pytest.raises(CertificateError, match=r"no certificate was issued to 'site-9' \(issued: .*site-1"):
        revoke(workspace, "site-9", REVOKED_AT)
    assert not workspace.crl_path.exists()


def _revoke_in_child(workspace: StudyWorkspace, name: str) -> None:
    revoke(workspace, name, REVOKED_AT)


def test_revokes_run_at_once_each_keep_their_revocation(workspace: StudyWorkspace) -> None:
    # lead IT scripting several revokes in parallel: each read the ledger, and the last to write it back
    # dropped the others' revocations from the ledger and the CRL (4 of 6 listed), though all said "revoked"
    names = ["site-1", "site-2", "site-3", "admin@study.org", "lead@study.org"]
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_revoke_in_child, args=(workspace, name)) for name in names]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [c.exitcode for c in children] == [0] * len(names)
    ledger = load_ledger(workspace.ledger_path)
    assert sorted(r.name for r in ledger.revoked) == sorted(names)
    crl = x509.load_pem_x509_crl(workspace.crl_path.read_bytes())
    assert {r.serial_number for r in crl} == {int(r.serial) for r in ledger.revoked}
    assert workspace.published_crl_path.read_bytes() == workspace.crl_path.read_bytes()
    assert not [p.name for p in workspace.state_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_server_kit_issued_after_a_revoke_refuses_the_revoked_from_its_first_start(
    workspace: StudyWorkspace, example_project: Project, renderer: KitRenderer
) -> None:
    revoke(workspace, "site-2", REVOKED_AT)
    without = example_project.model_copy(update={"participants": tuple(
        p for p in example_project.participants if p.name != "site-2")})  # lead IT took it out of the study
    later = provision(without, workspace.root.parent, REVOKED_AT + dt.timedelta(hours=1), renderer)
    server = next(k for k in later.kits if k.kind is Kind.SERVER)
    assert (server.kit_dir / "local" / "crl.pem").read_bytes() == workspace.crl_path.read_bytes()
    with zipfile.ZipFile(server.zip_path) as z:
        assert z.read(f"{server.name}/local/crl.pem") == workspace.crl_path.read_bytes()
    assert verify_kit(server.kit_dir).is_intact  # local/ is site-owned: the CRL is not in the manifest
    assert not any((k.kit_dir / "local" / "crl.pem").exists() for k in later.kits if k.kind is not Kind.SERVER)


def test_a_study_with_no_revocation_issues_its_server_kit_without_a_crl(workspace: StudyWorkspace) -> None:
    assert not (workspace.root / "prod_01" / "localhost" / "local" / "crl.pem").exists()
