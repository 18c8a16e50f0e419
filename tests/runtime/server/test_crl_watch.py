"""The server's CRL: re-read when local/crl.pem changes, but a deleted, older or broken file never
un-revokes anyone: the last good list stays in force and the problem is reported once per change; and a
server that has enforced a CRL refuses to start without one."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from provision.certs import CertificateAuthority, create_ca
from provision.revoke import build_crl
from provision.state import Revocation
from runtime.crl import CrlPin
from runtime.errors import CertificateError
from runtime.server.crl_watch import CrlWatcher

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_ca("study", NOW, 30)


def write_crl(path: Path, ca: CertificateAuthority, serials: list[int], number: int) -> None:
    revocations = tuple(Revocation(name=f"n{s}", serial=str(s), revoked_at=NOW) for s in serials)
    path.write_bytes(build_crl(ca, revocations, NOW, number))
    st = path.stat()  # a new mtime even within the filesystem's timestamp granularity
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + number * 1_000_000_000))


class Kit:
    def __init__(self, root: Path, ca: CertificateAuthority):
        self.crl = root / "local" / "crl.pem"
        self.crl.parent.mkdir(parents=True)
        self.root_ca = root / "rootCA.pem"
        self.root_ca.write_bytes(ca.cert_pem)
        self.pin = root / "workspace" / "crl_pin.json"
        self.pin.parent.mkdir()
        self.problems: list[str] = []

    def watcher(self) -> CrlWatcher:
        return CrlWatcher(self.crl, self.root_ca, CrlPin(self.pin), self.problems.append)


@pytest.fixture
def kit(tmp_path: Path, ca: CertificateAuthority) -> Kit:
    return Kit(tmp_path, ca)


def test_no_crl_ever_means_nobody_is_revoked(kit: Kit) -> None:
    w = kit.watcher()
    w.load_at_start()
    assert w.revoked() == frozenset() and w.pem() == b""


def test_a_new_crl_applies_at_once(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    w = kit.watcher()
    w.load_at_start()
    assert w.revoked() == {1}
    write_crl(kit.crl, ca, [1, 2], 11)
    assert w.revoked() == {1, 2} and w.pem() == kit.crl.read_bytes()
    assert kit.problems == []


def test_a_deleted_crl_keeps_the_last_one_in_force_and_is_reported_once(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    w = kit.watcher()
    w.load_at_start()
    served = w.pem()
    kit.crl.unlink()
    assert w.revoked() == {1} and w.revoked() == {1}
    assert w.pem() == served
    assert len(kit.problems) == 1 and "deleted; still enforcing CRL number 10" in kit.problems[0]


def test_an_older_crl_is_refused_and_the_newer_stays(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    w = kit.watcher()
    w.load_at_start()
    write_crl(kit.crl, ca, [], 9)  # the list from before site 1 was revoked
    assert w.revoked() == {1}
    assert len(kit.problems) == 1 and "CRL number 9 is older than number 10" in kit.problems[0]


def test_a_foreign_or_broken_crl_is_refused_and_the_last_good_stays(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    w = kit.watcher()
    w.load_at_start()
    write_crl(kit.crl, create_ca("study", NOW, 30), [], 20)
    assert w.revoked() == {1}
    kit.crl.write_bytes(b"garbage")
    assert w.revoked() == {1}
    assert ["not signed by this study's root CA" in kit.problems[0], "not a PEM" in kit.problems[1]] == [True, True]


def test_start_refuses_a_missing_crl_once_one_was_enforced(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    kit.watcher().load_at_start()
    kit.crl.unlink()
    with pytest.raises(CertificateError, match="crl.pem: missing, but this server has enforced CRL number 10"):
        kit.watcher().load_at_start()


def test_start_refuses_an_older_crl_than_one_enforced(kit: Kit, ca: CertificateAuthority) -> None:
    write_crl(kit.crl, ca, [1], 10)
    kit.watcher().load_at_start()
    write_crl(kit.crl, ca, [], 9)
    with pytest.raises(CertificateError, match="CRL number 9 is older than number 10"):
        kit.watcher().load_at_start()
