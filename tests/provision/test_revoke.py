"""Revocation: a CA-signed CRL listing every serial issued to the name, which openssl then enforces."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from provision import KitRenderer, Project, provision, revoke
from provision.state import StudyWorkspace, load_ledger
from runtime.errors import CertificateError

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
