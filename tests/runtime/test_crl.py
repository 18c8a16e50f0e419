"""The study CRL as sites, consoles and the server read it: only the study CA's lists, never an older one
than already seen, and a server certificate on the list is refused in one line."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509

from provision.certs import CertificateAuthority, create_ca, issue_credential
from provision.project import ServerSpec
from provision.revoke import build_crl
from provision.state import Revocation
from runtime.crl import Crl, CrlPin, parse_crl
from runtime.errors import CertificateError
from runtime.server_trust import check_not_revoked

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
CA = CertificateAuthority
Cert = x509.Certificate


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_ca("study", NOW, 30)


def crl_of(ca: CertificateAuthority, serials: list[int], number: int) -> bytes:
    revocations = tuple(Revocation(name=f"n{s}", serial=str(s), revoked_at=NOW) for s in serials)
    return build_crl(ca, revocations, NOW, number)


@pytest.fixture(scope="module")
def server_cert(ca: CertificateAuthority) -> x509.Certificate:
    spec = ServerSpec(type="server", name="fl", org="lead", fed_learn_port=8002, admin_port=8003)
    return issue_credential(ca, spec, NOW, 30, "study").cert


def test_parse_reads_number_and_serials(ca: CertificateAuthority) -> None:
    crl = parse_crl(crl_of(ca, [1, 2], 7), ca.cert, "crl.pem")
    assert (crl.number, crl.revoked) == (7, frozenset({1, 2}))


def test_a_crl_of_another_ca_is_refused(ca: CertificateAuthority) -> None:
    other = create_ca("study", NOW, 30)  # same name, other key: only the signature tells them apart
    with pytest.raises(CertificateError, match="crl.pem: not signed by this study's root CA"):
        parse_crl(crl_of(other, [1], 7), ca.cert, "crl.pem")


def test_garbage_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="crl.pem: not a PEM certificate revocation list"):
        parse_crl(b"nope", ca.cert, "crl.pem")


def test_pin_accepts_equal_and_higher_and_refuses_lower(ca: CertificateAuthority, tmp_path: Path) -> None:
    pin = CrlPin(tmp_path / "crl_pin.json")
    assert pin.highest() is None
    pin.accept(Crl(5, frozenset(), b""), "x")
    pin.accept(Crl(5, frozenset(), b""), "x")
    pin.accept(Crl(9, frozenset(), b""), "x")
    assert CrlPin(tmp_path / "crl_pin.json").highest() == 9  # survives a restart
    with pytest.raises(CertificateError, match="x: CRL number 8 is older than number 9 already seen"):
        pin.accept(Crl(8, frozenset(), b""), "x")
    assert json.loads((tmp_path / "crl_pin.json").read_text()) == {"crl_number": 9}


def test_a_damaged_pin_is_an_error_not_forgotten(tmp_path: Path) -> None:
    (tmp_path / "crl_pin.json").write_text("{")
    with pytest.raises(CertificateError, match="crl_pin.json: unreadable"):
        CrlPin(tmp_path / "crl_pin.json").highest()


def test_server_not_on_the_list_passes_and_the_number_is_pinned(ca: CA, server_cert: Cert, tmp_path: Path) -> None:
    pin = CrlPin(tmp_path / "pin.json")
    crl = check_not_revoked(crl_of(ca, [1], 10), server_cert, ca.cert, pin, "fl:8002")
    assert crl is not None and pin.highest() == 10


def test_a_revoked_server_is_refused_in_one_line(ca: CA, server_cert: Cert, tmp_path: Path) -> None:
    serial = server_cert.serial_number
    with pytest.raises(CertificateError) as err:
        check_not_revoked(crl_of(ca, [serial], 10), server_cert, ca.cert, CrlPin(tmp_path / "p.json"), "fl:8002")
    assert str(err.value) == (f"server fl:8002's certificate (serial {serial}) is revoked by the study CRL "
                              "(number 10); refusing to talk to it: tell lead IT")


def test_an_older_crl_from_the_server_is_refused(ca: CA, server_cert: Cert, tmp_path: Path) -> None:
    pin = CrlPin(tmp_path / "pin.json")
    check_not_revoked(crl_of(ca, [server_cert.serial_number - 1], 10), server_cert, ca.cert, pin, "fl:8002")
    # an old list, from before the server was revoked, replayed to un-revoke it
    with pytest.raises(CertificateError, match="CRL number 9 is older than number 10"):
        check_not_revoked(crl_of(ca, [], 9), server_cert, ca.cert, pin, "fl:8002")


def test_no_crl_is_fine_until_one_was_seen(ca: CA, server_cert: Cert, tmp_path: Path) -> None:
    pin = CrlPin(tmp_path / "pin.json")
    assert check_not_revoked(b"", server_cert, ca.cert, pin, "fl:8002") is None
    check_not_revoked(crl_of(ca, [], 3), server_cert, ca.cert, pin, "fl:8002")
    with pytest.raises(CertificateError, match="serves no revocation list, but this kit has seen CRL number 3"):
        check_not_revoked(b"", server_cert, ca.cert, pin, "fl:8002")
