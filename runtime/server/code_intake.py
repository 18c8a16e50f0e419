"""At submit: a job's code hash, and the admin's signature over it when one came with the upload.

The server checks a signature only so that a wrong one fails at submit, with a line for the admin, rather
than at every site; sites never rely on this check (they recompute the hash and verify the signature and
the signer's certificate themselves, against their own CA). Runs in a worker thread (hashing a zip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import JobRejected
from ..job_code import CodeSignature, code_hash_of_zip, verify_signature


@dataclass(frozen=True)
class SignedCode:
    code_sha256: str
    signed_by: str = ""
    signature: dict[str, Any] | None = None  # as stored and passed on to sites


def signed_code(archive: bytes | Path, signature: Any) -> SignedCode:
    """The archive's code hash and, if `signature` (untrusted upload JSON) is given, its checked form.
    Raises JobRejected when the signature is malformed or does not sign this archive's code."""
    code_sha256 = code_hash_of_zip(archive)
    if signature is None:
        return SignedCode(code_sha256)
    try:
        parsed = CodeSignature.model_validate(signature)
    except ValidationError as e:
        where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "(top level)"
        raise JobRejected(f"code signature: field '{where}': {e.errors()[0]['msg']}") from None
    signer = verify_signature(parsed, code_sha256)
    return SignedCode(code_sha256, signer.identity.name, parsed.model_dump(mode="json"))
