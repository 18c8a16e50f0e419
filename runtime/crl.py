"""The study's certificate revocation list (CRL), as every participant reads it: parsed only when the study
CA signed it, and never allowed to go back to an older list.

A CRL is only as good as its freshness: anyone holding an old, genuinely signed list (before someone was
revoked) could hand it out to un-revoke them, and deleting the file would do the same. So each reader
remembers the highest CRL number it has accepted in a small pin file in its own workspace (`CrlPin`) and
refuses a lower one, and a reader that has seen a list refuses to carry on without one.

Pure checks plus one tiny JSON file; no network, no grpc.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .errors import CertificateError

PIN_FILE = "crl_pin.json"


@dataclass(frozen=True)
class Crl:
    """A CRL the study CA signed: its CRL number, the revoked serials and the PEM bytes as read."""

    number: int
    revoked: frozenset[int]
    pem: bytes


def load_root_ca(path: Path) -> x509.Certificate:
    """The kit's root CA certificate. Raises CertificateError naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise CertificateError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate") from None


def parse_crl(pem: bytes, root_ca: x509.Certificate, label: str) -> Crl:
    """Check and read a PEM CRL; `label` names it in errors (a file, or 'the CRL served by HOST:PORT').

    Raises CertificateError when it is not a CRL, the study CA did not sign it, or it has no CRL number.
    """
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as e:
        raise CertificateError(f"{label}: not a PEM certificate revocation list ({e})") from None
    if crl.issuer != root_ca.subject or not crl.is_signature_valid(root_ca.public_key()):  # type: ignore[arg-type]
        raise CertificateError(f"{label}: not signed by this study's root CA")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise CertificateError(f"{label}: has no CRL number; re-run `fedkit provision revoke` to issue a new one") \
            from None
    return Crl(number=number, revoked=frozenset(r.serial_number for r in crl), pem=pem)


class CrlPin:
    """The highest CRL number this participant has accepted, kept in `path` (JSON) across restarts."""

    def __init__(self, path: Path):
        self.path = path

    def highest(self) -> int | None:
        """The pinned number, or None when no CRL was ever accepted here. Raises CertificateError when the
        pin file is unreadable: silently forgetting it would allow exactly the rollback it guards against."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CertificateError(f"{self.path}: unreadable ({e}); restore it, or delete it only if you are "
                                   "sure the CRL you have is the latest from lead IT") from None
        number = data.get("crl_number") if isinstance(data, dict) else None
        if not isinstance(number, int) or isinstance(number, bool):
            raise CertificateError(f"{self.path}: no integer 'crl_number'; restore it, or delete it only if "
                                   "you are sure the CRL you have is the latest from lead IT")
        return number

    def accept(self, crl: Crl, label: str) -> None:
        """Record `crl` as seen, or raise CertificateError if it is older than one already accepted."""
        highest = self.highest()
        if highest is not None and crl.number < highest:
            raise CertificateError(f"{label}: CRL number {crl.number} is older than number {highest} already seen "
                                   "here; refusing to go back to an old revocation list (get the latest from lead IT)")
        if highest is None or crl.number > highest:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"crl_number": crl.number}) + "\n")
            os.replace(tmp, self.path)


__all__ = ["PIN_FILE", "Crl", "CrlPin", "load_root_ca", "parse_crl"]
