"""Sign a kit: hash every covered file and write `startup/signature.json`, signed with the study CA key.

Which files are covered, how they are hashed and which bytes are signed are defined once, in
runtime.kitsig, the verifier every kit carries; this module only supplies the CA key. It must run after
every step that adds a file to a kit, or the late file would show up as "extra" at start-up.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.kitsig import SIGNATURE_PATH, is_covered, signature_document, signed_payload

from .certs import CertificateAuthority
from .kit import Kit, KitFile


def sign_kit(kit: Kit, ca: CertificateAuthority) -> None:
    """Add `startup/signature.json` to `kit`. Raises ValueError if the kit is already signed."""
    files = {rel: f.sha256 for rel, f in kit.files.items() if is_covered(rel)}
    signed_by = ca.cert.subject.rfc4514_string()
    signature = ca.key.sign(signed_payload(files, signed_by), ec.ECDSA(hashes.SHA256()))
    kit.add(SIGNATURE_PATH, KitFile.of(signature_document(files, signed_by, signature)))
