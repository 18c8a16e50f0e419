"""The study's certificate authority and the certificates it issues to each participant.

Keys are ECDSA P-256: key generation takes well under a millisecond (RSA-2048 takes ~50 ms, which alone
would eat a third of the 100-site budget), TLS handshakes are cheaper, and gRPC's BoringSSL accepts them.
Identity lives in the subject (runtime.identity.subject_for), so the server learns a peer's name, org,
kind and role from its certificate. This module creates keys and certificates in memory and writes only
the CA's own files; it never puts the CA key anywhere but the workspace's `state/` folder.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.errors import CertificateError
from runtime.identity import subject_for

from ._files import write_private_file, write_public_file
from .project import AdminSpec, ParticipantSpec, ServerSpec, is_ip_literal

KEY_CURVE = ec.SECP256R1
SIGNATURE_HASH = hashes.SHA256
# Back-date notBefore a little so a peer whose clock runs slightly behind still accepts a fresh cert.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    """The study's root: its key signs every participant cert, every kit manifest and the CRL."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IssuedCredential:
    """A participant's fresh key and certificate; the key lives only in memory until its kit is written."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(KEY_CURVE())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: a kit's runtime must start unattended, so the file mode (0600) protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(study: str, now: dt.datetime, validity_days: int) -> CertificateAuthority:
    """A self-signed root CA for `study`, valid `validity_days` from `now` (UTC)."""
    key = new_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{study} root CA"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, study[:64]),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, SIGNATURE_HASH())
    )
    return CertificateAuthority(key=key, cert=cert)


def save_ca(ca: CertificateAuthority, cert_path: Path, key_path: Path) -> None:
    """Write the CA's cert (0644) and key (0600 from the moment it exists); refuses to overwrite either."""
    write_private_file(key_path, private_key_pem(ca.key))
    write_public_file(cert_path, ca.cert_pem)


def load_ca(cert_path: Path, key_path: Path, now: dt.datetime) -> CertificateAuthority:
    """Load the CA kept in `state/`. Raises CertificateError if it is unreadable, mismatched or expired."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertificateError(
            f"{cert_path.parent}: cannot load the study CA ({e}); restore state/ from backup"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"{key_path}: does not match {cert_path.name}; restore state/ from backup")
    if cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"{cert_path}: the study CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "provision into a new workspace to start a new CA"
        )
    return CertificateAuthority(key=key, cert=cert)


def _key_usage_signature_only() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entry(host: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(host)) if is_ip_literal(host) else x509.DNSName(host)


def participant_uri(study: str, participant: ParticipantSpec) -> str:
    """The URI SAN of a client or admin cert: names the study too, and RFC 5280 path validators (such as
    cryptography's ClientVerifier) require a SAN on every end-entity cert."""
    return f"fedkit://{study}/{participant.kind.value}/{participant.name}"


def issue_credential(
    ca: CertificateAuthority, participant: ParticipantSpec, now: dt.datetime, validity_days: int, study: str
) -> IssuedCredential:
    """A new key and a CA-signed certificate for one participant.

    The server cert carries its host names as SANs and serverAuth (plus clientAuth, harmless, so the same
    cert can dial out if the runtime ever needs to); clients and admins get clientAuth and a URI SAN
    (participant_uri). Validity is capped at the CA's own expiry: a chain is never valid past its root.
    """
    key = new_private_key()
    role = participant.role if isinstance(participant, AdminSpec) else None
    not_after = min(now + dt.timedelta(days=validity_days), ca.cert.not_valid_after_utc)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_for(participant.name, participant.org, participant.kind, role))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage_signature_only(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if isinstance(participant, ServerSpec):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in participant.san_hosts]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(participant_uri(study, participant))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return IssuedCredential(key=key, cert=builder.sign(ca.key, SIGNATURE_HASH()))
