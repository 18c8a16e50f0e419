"""Who a peer is, read from its X.509 certificate and never from a message field.

Certificates fedkit issues carry: CN = participant name, O = org, OU = kind (server | client | admin),
and for admins the role in the `title` attribute. This module is shared by provisioning (which writes
these attributes) and the runtime (which reads them), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import CertificateError


class Kind(StrEnum):
    SERVER = "server"
    CLIENT = "client"
    ADMIN = "admin"


class Role(StrEnum):
    PROJECT_ADMIN = "project_admin"
    ORG_ADMIN = "org_admin"
    LEAD = "lead"
    MEMBER = "member"


KIND_OID = NameOID.ORGANIZATIONAL_UNIT_NAME
ROLE_OID = NameOID.TITLE


@dataclass(frozen=True)
class Identity:
    name: str
    org: str
    kind: Kind
    role: Role | None = None


def subject_for(name: str, org: str, kind: Kind, role: Role | None = None) -> x509.Name:
    """The subject fedkit writes into a participant's certificate."""
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(KIND_OID, kind.value),
    ]
    if role is not None:
        attrs.append(x509.NameAttribute(ROLE_OID, role.value))
    return x509.Name(attrs)


def _one(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """Read name, org, kind and role from a certificate's subject.

    Raises CertificateError when an attribute fedkit relies on is missing or unknown.
    """
    subject = cert.subject
    name = _one(subject, NameOID.COMMON_NAME)
    org = _one(subject, NameOID.ORGANIZATION_NAME)
    kind_text = _one(subject, KIND_OID)
    if not name or not org or not kind_text:
        raise CertificateError(f"certificate '{subject.rfc4514_string()}' lacks CN, O or OU (kind)")
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise CertificateError(f"certificate for '{name}' has unknown kind '{kind_text}'") from None
    role_text = _one(subject, ROLE_OID)
    role = None
    if kind is Kind.ADMIN:
        try:
            role = Role(role_text or "")
        except ValueError:
            raise CertificateError(f"admin certificate for '{name}' has unknown role '{role_text}'") from None
    return Identity(name=name, org=org, kind=kind, role=role)


def identity_from_pem(pem: bytes) -> Identity:
    return identity_from_cert(x509.load_pem_x509_certificate(pem))
