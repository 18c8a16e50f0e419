"""Each `revoke` issues a CRL whose number is higher than the last one, even within one second or with a
clock that went back: readers refuse to go back to a lower number, so numbers must only ever grow."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from provision import KitRenderer, Project, provision, revoke
from provision.state import StudyWorkspace

from .conftest import NOW


@pytest.fixture
def workspace(tmp_path: Path, example_project: Project, renderer: KitRenderer) -> StudyWorkspace:
    provision(example_project, tmp_path, NOW, renderer)
    return StudyWorkspace.for_study(tmp_path, example_project.name)


def crl_number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_crl_number_grows_with_every_revoke_even_at_the_same_instant(workspace: StudyWorkspace) -> None:
    at = NOW + dt.timedelta(days=1)
    numbers = []
    for name in ("site-1", "site-2", "site-2", "lead@study.org"):
        revoke(workspace, name, at)
        numbers.append(crl_number(workspace.crl_path))
        assert crl_number(workspace.published_crl_path) == numbers[-1]
    assert numbers == sorted(set(numbers)) and len(numbers) == 4


def test_crl_number_grows_when_the_clock_goes_back(workspace: StudyWorkspace) -> None:
    revoke(workspace, "site-1", NOW + dt.timedelta(days=2))
    first = crl_number(workspace.crl_path)
    revoke(workspace, "site-2", NOW + dt.timedelta(days=1))
    assert crl_number(workspace.crl_path) > first


def test_a_ledger_restored_from_before_a_revoke_does_not_unrevoke_anyone(workspace: StudyWorkspace) -> None:
    # state/ restored from a backup older than the revoke of site-1 (the README says to back it up): the next
    # revoke rebuilt the CRL from the ledger alone, and servers admitted site-1 again
    before = workspace.ledger_path.read_bytes()
    revoke(workspace, "site-1", NOW + dt.timedelta(days=1))
    site_1 = {r.serial_number for r in x509.load_pem_x509_crl(workspace.crl_path.read_bytes())}
    workspace.ledger_path.write_bytes(before)

    revoke(workspace, "site-2", NOW + dt.timedelta(days=2))

    listed = {r.serial_number for r in x509.load_pem_x509_crl(workspace.crl_path.read_bytes())}
    assert site_1 and site_1 < listed and len(listed) > len(site_1)
    again = revoke(workspace, "site-1", NOW + dt.timedelta(days=3))  # the ledger learnt it back from the CRL
    assert again.newly_revoked == () and {int(s) for s in again.already_revoked} == site_1
