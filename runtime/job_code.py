"""A job's code identity: one hash over the files of a job folder, and an admin's signature over it.

The code hash is what a site approves (`local/job_policy.yml` `code:`). It covers every file the job
archive holds (custom/*.py, the three config files as submitted, any model file), by path and content,
and nothing else: zip timestamps, compression, member order and file modes do not change it, so the same
folder hashes the same on the admin's laptop (`fedkit job hash FOLDER`), on the console at submit, and on
the site over the archive it actually received. `--set` overrides are not part of it; they travel
separately and are shown separately (sites that require approval refuse overrides of the learner).

An admin's console signs the hash with the admin's private key (ECDSA P-256, the admin kit's
startup/client.key) and sends the signature with its certificate; a site checks that certificate against
its own study CA and the signature against the hash it computed itself, so a server cannot swap code.

This module imports no grpc, torch or provision code, and never unpickles anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field

from .bounded_zip import is_plain_path
from .errors import CertificateError, JobRejected
from .identity import Identity, Kind, identity_from_cert
from .job_spec import MAX_JOB_FILES, MAX_JOB_ZIP_BYTES

CODE_HASH_FORMAT = b"fedkit-job-code-v1\n"
SIGNED_PREFIX = "fedkit job code sha256 "  # domain separation: such a signature means nothing else
MAX_CERT_PEM_CHARS = 8192
MAX_SIGNATURE_CHARS = 256  # base64 of a DER ECDSA P-256 signature is under 100
MAX_EXPANDED_BYTES = 4 * MAX_JOB_ZIP_BYTES  # as job_spec.safe_extract allows


def code_hash(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 hex over (path, content) pairs, in path order: each line is `<sha256(content)>  "<path>"`
    (the path JSON-quoted, so no file name can forge a line).

    Raises JobRejected when a path occurs twice (a zip can hold duplicates; extraction keeps one)."""
    return _combine((path, hashlib.sha256(data).hexdigest()) for path, data in files)


def _combine(file_hashes: Iterable[tuple[str, str]]) -> str:
    entries = sorted(file_hashes)
    paths = [p for p, _ in entries]
    if odd := next((p for p in paths if not is_plain_path(p)), None):
        raise JobRejected(f"job archive entry '{odd[:200]}' is not a plain relative path")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise JobRejected(f"job archive holds '{dup}' more than once")
    digest = hashlib.sha256(CODE_HASH_FORMAT)
    for path, content_sha in entries:
        digest.update(f"{content_sha}  {json.dumps(path)}\n".encode())
    return digest.hexdigest()


def code_hash_of_zip(data: bytes | Path) -> str:
    """The code hash of a job archive: every member but directory entries, nothing skipped, so what a
    site extracts and runs is exactly what is hashed. Members are hashed as they decompress, within
    job_spec's limits on count and expanded size. Raises JobRejected on a damaged or oversized zip."""
    try:
        with zipfile.ZipFile(data if isinstance(data, Path) else io.BytesIO(data)) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_JOB_FILES:
                raise JobRejected(f"job archive holds {len(infos)} files (limit {MAX_JOB_FILES})")
            budget = [MAX_EXPANDED_BYTES]
            return _combine((info.filename, _member_sha256(zf, info, budget)) for info in infos)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError, ValueError) as e:
        raise JobRejected(f"job archive is not a valid zip ({e})") from None


def _member_sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int]) -> str:
    """One member's SHA-256, decompressed in pieces; `budget` (bytes left for the whole archive) shrinks
    with what was read, whatever the member's header claims."""
    digest = hashlib.sha256()
    with zf.open(info) as f:
        while piece := f.read(1 << 20):
            budget[0] -= len(piece)
            if budget[0] < 0:
                raise JobRejected("job archive expands too large")
            digest.update(piece)
    return digest.hexdigest()


def signed_message(code_sha256: str) -> bytes:
    return (SIGNED_PREFIX + code_sha256).encode()


class CodeSignature(BaseModel):
    """What travels with a signed job: the hash the admin signed, the signature and the signer's
    certificate. Bounded, so a hostile upload cannot park megabytes in every task config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(min_length=1, max_length=MAX_SIGNATURE_CHARS, description="base64 DER ECDSA")
    certificate: str = Field(min_length=1, max_length=MAX_CERT_PEM_CHARS, description="signer's cert, PEM")


def sign_code(code_sha256: str, key_pem: bytes, cert_pem: bytes) -> CodeSignature:
    """Sign a code hash with an admin's private key (ECDSA P-256, SHA-256)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError("the admin key is not a readable PEM private key; use your fedkit admin kit's") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the admin key is not an EC key; use the key from your fedkit admin kit")
    signature = key.sign(signed_message(code_sha256), ec.ECDSA(hashes.SHA256()))
    return CodeSignature(code_sha256=code_sha256, signature=base64.b64encode(signature).decode(),
                         certificate=cert_pem.decode())


@dataclass(frozen=True)
class VerifiedSigner:
    """Who signed a job's code, once the signature and (optionally) the certificate chain checked out."""

    identity: Identity
    serial_number: int


def verify_signature(sig: CodeSignature, code_sha256: str) -> VerifiedSigner:
    """Check that `sig` signs `code_sha256` (the hash the caller computed itself, not the one in `sig`).
    Raises JobRejected saying what does not hold; says nothing yet about who issued the certificate."""
    if sig.code_sha256 != code_sha256:
        raise JobRejected(f"the signature is over code {sig.code_sha256[:16]}..., but the code received here "
                          f"hashes to {code_sha256[:16]}... (the code was changed after signing)")
    try:
        cert = x509.load_pem_x509_certificate(sig.certificate.encode())
        raw = base64.b64decode(sig.signature, validate=True)
    except (ValueError, binascii.Error):
        raise JobRejected("the code signature or its certificate is malformed") from None
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise JobRejected("the signer's certificate does not hold an EC key")
    try:
        public_key.verify(raw, signed_message(code_sha256), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JobRejected("the code signature does not verify with the signer's certificate") from None
    try:
        identity = identity_from_cert(cert)
    except CertificateError as e:
        raise JobRejected(f"the signer's certificate: {e}") from None
    return VerifiedSigner(identity, cert.serial_number)


def verify_signer_chain(sig: CodeSignature, root_ca_pem: bytes, revoked: frozenset[int] = frozenset(),
                        now: datetime | None = None) -> None:
    """Check that the signer's certificate was issued by this study's CA, is valid now, is an admin's
    and is not revoked. Raises JobRejected naming the failing check."""
    cert = x509.load_pem_x509_certificate(sig.certificate.encode())
    ca = x509.load_pem_x509_certificate(root_ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise JobRejected("the signer's certificate was not issued by this study's CA") from None
    now = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise JobRejected("the signer's certificate is not valid now (expired or not yet valid)")
    try:
        identity = identity_from_cert(cert)
    except CertificateError as e:
        raise JobRejected(f"the signer's certificate: {e}") from None
    if identity.kind is not Kind.ADMIN:
        raise JobRejected(f"the code was signed by '{identity.name}', a {identity.kind.value}, not an admin")
    if cert.serial_number in revoked:
        raise JobRejected(f"the signer '{identity.name}' has a revoked certificate")
