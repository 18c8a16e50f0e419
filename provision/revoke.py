"""Revoke a participant: add every serial ever issued to it to the study's CA-signed CRL.

Kits are signed, so the CRL never goes into one: it is written to `state/crl.pem` and published as
`WORKSPACE/<study>/crl.pem`, and site IT copies it to the server kit's `local/crl.pem` (local/ is
site-owned and unsigned); the server serves it on to sites and consoles. A server kit provisioned later
gets it in its local/crl.pem from the start (pipeline.add_crl). Serials come from the
issued-cert ledger, so a name issued in several runs is revoked in all of them. Re-running regenerates the
CRL from the ledger, so it is safe to repeat; every CRL gets a higher CRL number than the last, because
every reader refuses to go back to a lower one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from runtime.errors import CertificateError

from ._files import replace_file
from .certs import SIGNATURE_HASH, CertificateAuthority, load_ca
from .state import Ledger, Revocation, StudyWorkspace, load_ledger, save_ledger


@dataclass(frozen=True)
class RevokeResult:
    name: str
    newly_revoked: tuple[str, ...]
    already_revoked: tuple[str, ...]
    crl_path: Path
    published_crl_path: Path


def next_crl_number(previous_crl: Path, now: dt.datetime) -> int:
    """The issue time in seconds, or one more than the previous CRL's number when that is not lower.

    Readers (server, sites, consoles) refuse a CRL numbered below one they have seen, so numbers must only
    grow: two revokes in one second, or a clock set back, must still yield a larger number.
    """
    number = int(now.timestamp())
    try:
        previous = x509.load_pem_x509_crl(previous_crl.read_bytes())
        last = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except FileNotFoundError:
        return number
    except (OSError, ValueError, x509.ExtensionNotFound) as e:
        raise CertificateError(f"{previous_crl}: cannot read the previous CRL's number ({e}); restore it "
                               "from backup so the new CRL can be numbered above it") from None
    return max(number, last + 1)


def _previously_revoked(previous_crl: Path) -> list[tuple[str, dt.datetime]]:
    """(serial, revocation date) of every entry of the last CRL written (none before the first revoke)."""
    try:
        crl = x509.load_pem_x509_crl(previous_crl.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise CertificateError(f"{previous_crl}: cannot read the previous CRL ({e}); restore it from backup so "
                               "the new CRL keeps everyone it revoked") from None
    return [(str(r.serial_number), r.revocation_date_utc) for r in crl]


def _missing_from(ledger: Ledger, previous: list[tuple[str, dt.datetime]]) -> list[Revocation]:
    done = ledger.revoked_serials()
    names = {c.serial: c.name for c in ledger.issued}
    return [Revocation(name=names.get(serial, "(in the previous CRL only)"), serial=serial, revoked_at=when)
            for serial, when in previous if serial not in done]


def build_crl(ca: CertificateAuthority, revocations: tuple[Revocation, ...], now: dt.datetime,
              number: int | None = None) -> bytes:
    """A PEM CRL listing `revocations`, signed by the CA, with CRL number `number` (default: `now` in s).

    nextUpdate is the CA's own expiry: OpenSSL rejects every peer once a CRL is past nextUpdate, and this
    CRL changes only when lead IT revokes someone, so an earlier date would only break the study silently.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(ca.cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(int(now.timestamp()) if number is None else number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for r in revocations:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(r.serial)).revocation_date(r.revoked_at).build()
        )
    return builder.sign(ca.key, SIGNATURE_HASH()).public_bytes(serialization.Encoding.PEM)


def revoke(workspace: StudyWorkspace, name: str, now: dt.datetime) -> RevokeResult:
    """Revoke every certificate issued to `name` and rewrite both CRL files.

    Raises CertificateError when no certificate was ever issued to `name` or the CA cannot be loaded.
    """
    with workspace.locked():
        return _revoke(workspace, name, now)


def _revoke(workspace: StudyWorkspace, name: str, now: dt.datetime) -> RevokeResult:
    ledger = load_ledger(workspace.ledger_path)
    serials = ledger.serials_of(name)
    if not serials:
        known = sorted({c.name for c in ledger.issued})
        raise CertificateError(
            f"{workspace.ledger_path}: no certificate was issued to '{name}'"
            + (f" (issued: {', '.join(known)})" if known else "; nothing has been provisioned here")
        )
    ca = load_ca(workspace.ca_cert_path, workspace.ca_key_path, now)
    # every serial the last CRL listed stays listed: a state/issued.json restored from a backup older than a
    # revoke would otherwise publish a newer CRL without it, and servers would admit that participant again
    ledger = ledger.with_revoked(_missing_from(ledger, _previously_revoked(workspace.crl_path)))
    done = ledger.revoked_serials()
    new = [s for s in serials if s not in done]
    ledger = ledger.with_revoked([Revocation(name=name, serial=s, revoked_at=now) for s in new])
    crl_pem = build_crl(ca, ledger.revoked, now, next_crl_number(workspace.crl_path, now))
    # the ledger first: the CRL is rebuilt from it, so a failure between the two writes leaves a revocation
    # the next revoke still lists; the other order could publish a CRL the next one drops it from
    save_ledger(workspace.ledger_path, ledger)
    replace_file(workspace.crl_path, crl_pem)
    replace_file(workspace.published_crl_path, crl_pem)
    return RevokeResult(
        name=name,
        newly_revoked=tuple(new),
        already_revoked=tuple(s for s in serials if s in done),
        crl_path=workspace.crl_path,
        published_crl_path=workspace.published_crl_path,
    )
