"""Certificate checks the runtime makes itself, beyond what the TLS handshake verifies:
a process refuses to start on an expired or not-yet-valid certificate of its own or on a private key
others can read, and the server refuses peers listed in the project's certificate revocation list
(local/crl.pem, read by runtime.crl and runtime.server.crl_watch)."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from .errors import CertificateError
from .identity import Identity


def check_validity(cert: x509.Certificate, label: str, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{label} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                               "ask lead IT for a new kit")


EXPIRY_WARNING_DAYS = 30  # a participant whose certificate ends sooner hears so at start and once a day
DAY_S = 86400.0


def expiry_warning(cert: x509.Certificate, label: str, now: datetime | None = None,
                   ca: x509.Certificate | None = None) -> str | None:
    """One line for a certificate that ends within EXPIRY_WARNING_DAYS; None for one that does not.
    After that date this participant can no longer connect, and only lead IT can issue a new kit; when the
    study CA (`ca`) ends then too, a kit renewed under it cannot help, and the line says so."""
    now = now or datetime.now(UTC)
    left = cert.not_valid_after_utc - now
    if left > timedelta(days=EXPIRY_WARNING_DAYS):
        return None
    fix = ("ask lead IT for a new kit before then" if ca is None or ca.not_valid_after_utc - cert.not_valid_after_utc
           > timedelta(days=1) else "the study CA ends then too: lead IT must create a new study CA and issue "
           "every participant a new kit")
    return (f"{label} expires on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (in {max(left.days, 0)} days): "
            f"after that it cannot connect; {fix}")


async def warn_before_expiry(cert: x509.Certificate, label: str, warn: Callable[[str], None],
                             clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                             ca: x509.Certificate | None = None) -> None:
    """For a process that runs for months: `warn(line)` at start and once a day while the certificate ends
    within EXPIRY_WARNING_DAYS; until then it sleeps (a day at a time, so a changed clock is followed)."""
    while True:
        message = expiry_warning(cert, label, clock(), ca)
        if message is not None:
            warn(message)
        await asyncio.sleep(DAY_S)


def check_private_key_mode(key: Path) -> None:
    """Refuse a private key that group or others may read or write: whoever else can read it can act as
    this participant. Raises CertificateError saying how to fix it; a missing file is left to the reader."""
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise CertificateError(f"{key}: private key is accessible to group or others (mode {mode:o}); "
                               f"run `chmod 600 {key}` and start again")


def not_revoked(revoked: Callable[[], frozenset[int]], on_revoked: Callable[[Identity], None] | None = None,
                ) -> Callable[[Identity, x509.Certificate], None]:
    """A peer check refusing revoked certificates; `revoked` is re-read so a new CRL applies at once.
    `on_revoked` hears of each refused peer (the registry marks a revoked site as such)."""

    def check(identity: Identity, cert: x509.Certificate) -> None:
        if cert.serial_number in revoked():
            if on_revoked is not None:
                on_revoked(identity)
            raise CertificateError(f"certificate of '{identity.name}' has been revoked")

    return check
