"""The server's revocation list: local/crl.pem, re-read whenever the file changes, and never allowed to
go backwards.

Site IT replaces local/crl.pem when lead IT revokes someone, and a running server applies it at the next
connection. What it must not do is treat a missing or older file as "nobody is revoked": the watcher
keeps enforcing the last good list, logs and audits the problem once per change of the file, and a
server whose workspace remembers a CRL refuses to start without one. The list it enforces is also what
it serves (Federation.GetCrl, Admin.GetCrl), so sites and consoles can check the server's own certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..crl import Crl, CrlPin, load_root_ca, parse_crl
from ..errors import CertificateError

log = logging.getLogger("fedkit.server.crl")

Problem = Callable[[str], None]  # told each new problem once, in one line (the server audits it)
_FileKey = tuple[int, int, int] | None  # (inode, size, mtime_ns) of the file, None when it is absent


def _file_key(path: Path) -> _FileKey:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class CrlWatcher:
    """The CRL in force. Call `load_at_start` once, then `revoked()` per connection and `pem()` to serve it.

    `pin` remembers the highest CRL number ever enforced (in the workspace), so neither a restart nor a
    replaced file can bring back an older list.
    """

    def __init__(self, path: Path, root_ca: Path, pin: CrlPin, on_problem: Problem):
        self._path = path
        self._root_ca = load_root_ca(root_ca)
        self._pin = pin
        self._on_problem = on_problem
        self._current: Crl | None = None
        self._seen: _FileKey = None

    def load_at_start(self) -> None:
        """Load local/crl.pem or refuse to start. Raises CertificateError when the file is malformed, not
        from this study's CA, older than a CRL enforced before, or missing while one was enforced before."""
        highest = self._pin.highest()
        self._seen = _file_key(self._path)
        if self._seen is None:
            if highest is not None:
                raise CertificateError(
                    f"{self._path}: missing, but this server has enforced CRL number {highest}; put the latest "
                    "crl.pem from lead IT back there (deleting it would un-revoke everyone)")
            return
        self._current = self._read()

    def revoked(self) -> frozenset[int]:
        """Serials revoked now. A changed file is re-read; a bad, older or missing one leaves the last good
        list in force and is reported once."""
        key = _file_key(self._path)
        if key != self._seen:
            self._seen = key
            if key is None:
                if self._current is not None:
                    self._problem(f"{self._path}: deleted; still enforcing CRL number {self._current.number} "
                                  "(put the latest crl.pem from lead IT back)")
            else:
                try:
                    self._current = self._read()
                    log.info("%s: now enforcing CRL number %d (%d revoked)", self._path, self._current.number,
                             len(self._current.revoked))
                except CertificateError as e:
                    still = f"CRL number {self._current.number}" if self._current else "no CRL"
                    self._problem(f"{e}; still enforcing {still}")
        return self._current.revoked if self._current else frozenset()

    def pem(self) -> bytes:
        """The CRL in force, as served to sites and consoles (b"" when there is none)."""
        self.revoked()
        return self._current.pem if self._current else b""

    def _read(self) -> Crl:
        try:
            pem = self._path.read_bytes()
        except OSError as e:
            raise CertificateError(f"{self._path}: cannot read ({e.strerror})") from None
        crl = parse_crl(pem, self._root_ca, str(self._path))
        self._pin.accept(crl, str(self._path))
        return crl

    def _problem(self, message: str) -> None:
        log.error("%s", message)
        self._on_problem(message)


__all__ = ["CrlWatcher"]
