"""runtime/identity.py: the identity read back from a certificate is the one written into it."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from runtime.errors import CertificateError
from runtime.identity import Identity, Kind, Role, identity_from_cert, identity_from_pem, subject_for

_KEY = ec.generate_private_key(ec.SECP256R1())


def _self_signed(subject: x509.Name) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )


def _name(**attrs: str) -> x509.Name:
    oids = {"cn": NameOID.COMMON_NAME, "o": NameOID.ORGANIZATION_NAME, "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
            "title": NameOID.TITLE}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


@pytest.mark.parametrize(
    "identity",
    [
        Identity(name="site-1", org="General Hospital", kind=Kind.CLIENT),
        Identity(name="fl.example.org", org="coordinating-center", kind=Kind.SERVER),
        *(Identity(name="alice@a.org", org="org-a", kind=Kind.ADMIN, role=r) for r in Role),
    ],
    ids=lambda i: f"{i.kind}-{i.role}",
)
def test_subject_for_round_trips_through_a_certificate(identity: Identity) -> None:
    cert = _self_signed(subject_for(identity.name, identity.org, identity.kind, identity.role))

    assert identity_from_cert(cert) == identity


def test_identity_from_pem_reads_the_same_identity() -> None:
    cert = _self_signed(subject_for("bob@b.org", "org-b", Kind.ADMIN, Role.LEAD))

    got = identity_from_pem(cert.public_bytes(Encoding.PEM))

    assert got == Identity(name="bob@b.org", org="org-b", kind=Kind.ADMIN, role=Role.LEAD)


def test_a_role_on_a_non_admin_certificate_is_ignored() -> None:
    cert = _self_signed(_name(cn="site-1", o="org-a", ou="client", title="project_admin"))

    assert identity_from_cert(cert).role is None


@pytest.mark.parametrize(
    "subject",
    [
        _name(cn="site-1", o="org-a"),
        _name(cn="site-1", ou="client"),
        _name(o="org-a", ou="client"),
    ],
    ids=["no-OU", "no-O", "no-CN"],
)
def test_a_missing_attribute_is_a_certificate_error(subject: x509.Name) -> None:
    with pytest.raises(CertificateError, match="lacks CN, O or OU"):
        identity_from_cert(_self_signed(subject))


def test_an_unknown_kind_is_a_certificate_error() -> None:
    cert = _self_signed(_name(cn="site-1", o="org-a", ou="robot"))

    with pytest.raises(CertificateError, match="unknown kind 'robot'"):
        identity_from_cert(cert)


@pytest.mark.parametrize("title", ["superuser", None], ids=["unknown-role", "no-role"])
def test_an_admin_without_a_known_role_is_a_certificate_error(title: str | None) -> None:
    attrs = {"cn": "alice@a.org", "o": "org-a", "ou": "admin"} | ({"title": title} if title else {})
    cert = _self_signed(_name(**attrs))

    with pytest.raises(CertificateError, match="unknown role"):
        identity_from_cert(cert)
