"""Verify a startup kit against its signed manifest, from inside the kit.

A kit's `startup/signature.json` lists the SHA-256 of every file the kit was issued with, and an ECDSA
(P-256, SHA-256) signature by the study's root CA over a canonical JSON form of that list. This module
holds the one definition of which files are covered, how they are hashed and what bytes are signed;
provisioning imports these functions to sign, so signer and verifier cannot disagree.

It runs before anything else in a kit (`start.sh` calls `python -m runtime.kitsig KIT_DIR`), so it imports
only the standard library and `cryptography`, never `provision`, grpc or torch. It answers with a per-file
report (ok, changed, missing, extra) rather than a bare bool, so a person can see what differs.

A kit checked only against its own `startup/rootCA.pem` would pass if someone replaced that CA and
re-signed every file with it. So `main` pins the CA: the first check writes the SHA-256 fingerprint of
`startup/rootCA.pem` to `local/ca.sha256` (site-owned, unsigned; site IT compares it with the fingerprint
lead IT gave them out of band, or writes that one there before the first start), and every later check
refuses a kit whose CA has another fingerprint. That file is the only thing this module ever writes.

Not covered, because site IT or the running runtime owns them: everything under `local/` except the
`*.example` files, everything under `workspace/`, and `*.pyc` files inside `__pycache__/` folders.
A `*.pyc` anywhere else is reported as extra: with the kit on PYTHONPATH, a stray `json.pyc` at the kit's
top would shadow the standard library, so it must not pass silently.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ConfigError, KitTamperedError, problems_line

# Same names as runtime.kit_config's STARTUP/SIGNATURE/ROOT_CA (a test pins them equal); spelled out here
# so this check needs only `cryptography`, not pydantic or yaml, on a host that only runs docker.sh.
SIGNATURE_PATH = "startup/signature.json"
ROOT_CA_PATH = "startup/rootCA.pem"
MANIFEST_FORMAT = 1
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
CA_PIN_PATH = "local/ca.sha256"
CA_PIN_MODE = 0o644  # site-owned and not secret: site IT reads and may write it
_HASH_CHUNK_BYTES = 1 << 20
_SHA256_HEX_CHARS = 64


class FileStatus(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    MISSING = "missing"
    EXTRA = "extra"
    LINK = "link"


_STATUS_TEXT = {
    FileStatus.CHANGED: "changed since the kit was signed",
    FileStatus.MISSING: "missing (listed in signature.json)",
    FileStatus.EXTRA: "extra (not listed in signature.json)",
    FileStatus.LINK: "a symbolic link to a folder (a kit holds none; the files behind it are not checked)",
}


@dataclass(frozen=True)
class FileCheck:
    """One file's verdict; `path` is kit-relative with forward slashes."""

    path: str
    status: FileStatus


@dataclass(frozen=True)
class KitReport:
    """The outcome of checking one kit: per-file verdicts plus whether the signature itself holds.

    `signature_problem` is None when signature.json was signed by the trusted root CA; otherwise it says
    why not, in one line. `files` is sorted by path and is empty when signature.json could not be read.
    """

    kit_dir: Path
    files: tuple[FileCheck, ...]
    signature_problem: str | None

    @property
    def is_intact(self) -> bool:
        return self.signature_problem is None and all(f.status is FileStatus.OK for f in self.files)

    def problems(self) -> list[str]:
        """One line per problem, kit-relative paths first so the lines sort and grep well."""
        lines = [f"{SIGNATURE_PATH}: {self.signature_problem}"] if self.signature_problem else []
        lines += [f"{f.path}: {_STATUS_TEXT[f.status]}" for f in self.files if f.status is not FileStatus.OK]
        return lines

    def raise_if_tampered(self) -> None:
        """Raise KitTamperedError, naming every problem on its one line, unless the kit is intact."""
        problems = self.problems()
        if problems:
            raise KitTamperedError(f"{problems_line(str(self.kit_dir), problems)}; re-unzip the kit you were sent")


def is_covered(rel_path: str) -> bool:
    """Whether a kit-relative POSIX path is part of the signed manifest (see the module docstring)."""
    parts = PurePosixPath(rel_path).parts
    if not parts or rel_path == SIGNATURE_PATH:
        return False
    if parts[0] == "workspace":
        return False
    if parts[0] == "local" and not rel_path.endswith(".example"):
        return False
    return not ("__pycache__" in parts[:-1] and parts[-1].endswith(".pyc"))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks so a large file never sits whole in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def kit_files(kit_dir: Path) -> list[str]:
    """Every covered file under `kit_dir`, as sorted kit-relative POSIX paths.

    Symlinked folders are not followed (their files then show up as missing); skipped folders
    (`workspace/`, `__pycache__/` and non-example `local/` files) are never read.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(kit_dir):
        rel_root = Path(root).relative_to(kit_dir).as_posix()
        if rel_root == "." and "workspace" in dirs:
            dirs.remove("workspace")
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if is_covered(rel):
                found.append(rel)
    return sorted(found)


def linked_folders(kit_dir: Path) -> list[str]:
    """Symbolic links to folders where the kit's files live, as sorted kit-relative paths. `kit_files` does
    not follow them, so what they hold was never checked: `yaml -> /elsewhere/yaml` at the kit's top would
    stand in for a library module, a linked `__pycache__` would bring bytecode the scripts never clear.
    Links under `workspace/` and inside `local/` (site IT's to own) are not reported."""
    found: list[str] = []
    for root, dirs, _files in os.walk(kit_dir):
        rel_root = Path(root).relative_to(kit_dir).as_posix()
        if rel_root == "." and "workspace" in dirs:
            dirs.remove("workspace")
        if rel_root == "local" or rel_root.startswith("local/"):
            continue
        for name in dirs:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if os.path.islink(os.path.join(root, name)):
                found.append(rel)
    return sorted(found)


def manifest_of_dir(kit_dir: Path) -> dict[str, str]:
    """kit-relative path -> SHA-256 hex of every covered file on disk."""
    return {rel: hash_file(kit_dir / rel) for rel in kit_files(kit_dir)}


def signed_payload(files: Mapping[str, str], signed_by: str) -> bytes:
    """The exact bytes the CA signs: canonical JSON (sorted keys, no spaces, ASCII) of the manifest."""
    body = {
        "algorithm": SIGNATURE_ALGORITHM,
        "files": dict(sorted(files.items())),
        "format": MANIFEST_FORMAT,
        "signed_by": signed_by,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def signature_document(files: Mapping[str, str], signed_by: str, signature: bytes) -> bytes:
    """The bytes of `startup/signature.json`: the manifest, readable, plus the base64 signature."""
    body = json.loads(signed_payload(files, signed_by))
    body["signature"] = base64.b64encode(signature).decode("ascii")
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("ascii")


@dataclass(frozen=True)
class _SignedManifest:
    files: dict[str, str]
    signed_by: str
    signature: bytes


def _read_signature(path: Path) -> _SignedManifest | str:
    """Parse signature.json; on failure return the one-line reason instead."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return "missing; this folder is not a signed fedkit kit"
    except (OSError, ValueError) as e:
        return f"unreadable ({e.__class__.__name__}: {e})"
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return f"unsupported format (expected format {MANIFEST_FORMAT})"
    if doc.get("algorithm") != SIGNATURE_ALGORITHM:
        return f"unsupported algorithm {doc.get('algorithm')!r} (expected {SIGNATURE_ALGORITHM})"
    files, signed_by, sig_text = doc.get("files"), doc.get("signed_by"), doc.get("signature")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "malformed 'files' (expected a mapping of path to sha256)"
    if not isinstance(signed_by, str) or not isinstance(sig_text, str):
        return "malformed ('signed_by' and 'signature' must be strings)"
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        return "malformed 'signature' (not base64)"
    return _SignedManifest(files=files, signed_by=signed_by, signature=signature)


def _check_signature(manifest: _SignedManifest, ca_pem: bytes, ca_label: str) -> str | None:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return f"cannot check: {ca_label} is not a PEM certificate"
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"cannot check: {ca_label} does not hold an EC key"
    try:
        public_key.verify(
            manifest.signature,
            signed_payload(manifest.files, manifest.signed_by),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        return f"signature does not verify against {ca_label}"
    return None


def verify_kit(kit_dir: Path, root_ca_pem: bytes | None = None) -> KitReport:
    """Check every file of the kit in `kit_dir` against its signed manifest.

    `root_ca_pem` is the CA to trust; None trusts the kit's own `startup/rootCA.pem`, which catches
    accidental and in-transit changes but not a kit re-signed by someone else's CA (pass the study CA
    obtained separately for that). Raises ConfigError only when `kit_dir` is not a folder; every other
    finding is in the report.
    """
    kit_dir = Path(kit_dir)
    if not kit_dir.is_dir():
        raise ConfigError(f"{kit_dir}: not a folder; pass the unzipped kit's top folder")
    manifest = _read_signature(kit_dir / SIGNATURE_PATH)
    if isinstance(manifest, str):
        return KitReport(kit_dir=kit_dir, files=(), signature_problem=manifest)

    on_disk = manifest_of_dir(kit_dir)
    checks = []
    for rel in sorted(set(on_disk) | set(manifest.files)):
        if rel not in on_disk:
            status = FileStatus.MISSING
        elif rel not in manifest.files:
            status = FileStatus.EXTRA
        else:
            status = FileStatus.OK if on_disk[rel] == manifest.files[rel] else FileStatus.CHANGED
        checks.append(FileCheck(path=rel, status=status))
    checks += [FileCheck(path=rel, status=FileStatus.LINK) for rel in linked_folders(kit_dir)]
    checks.sort(key=lambda c: c.path)

    if root_ca_pem is None:
        try:
            ca_pem, ca_label = (kit_dir / ROOT_CA_PATH).read_bytes(), ROOT_CA_PATH
        except OSError:
            return KitReport(kit_dir, tuple(checks), f"cannot check: {ROOT_CA_PATH} is unreadable")
    else:
        ca_pem, ca_label = root_ca_pem, "the given root CA"
    problem = _check_signature(manifest, ca_pem, ca_label)
    return KitReport(kit_dir=kit_dir, files=tuple(checks), signature_problem=problem)


def ca_fingerprint(ca_pem: bytes) -> str:
    """SHA-256 over the CA certificate's DER bytes, as `openssl x509 -noout -fingerprint -sha256` prints it
    (upper-case hex pairs joined by ':'). Raises ConfigError when `ca_pem` is not a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ConfigError(f"{ROOT_CA_PATH}: not a PEM certificate") from None
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def parse_fingerprint(text: str) -> str | None:
    """A SHA-256 fingerprint in any usual spelling (with or without ':' or spaces, any case) in the form
    `ca_fingerprint` returns; None when `text` is not one."""
    digits = "".join(text.split()).replace(":", "").upper()
    if len(digits) != _SHA256_HEX_CHARS or any(c not in "0123456789ABCDEF" for c in digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def check_ca_fingerprint(kit_dir: Path, expected: str) -> str | None:
    """None when the kit's startup/rootCA.pem has the fingerprint `expected`; otherwise the one-line reason.
    Raises ConfigError when `expected` is not a SHA-256 fingerprint or the CA cannot be read."""
    wanted = parse_fingerprint(expected)
    if wanted is None:
        raise ConfigError(f"'{expected}' is not a SHA-256 fingerprint (64 hex digits, ':' optional)")
    actual = _kit_ca_fingerprint(Path(kit_dir))
    if actual != wanted:
        return f"{ROOT_CA_PATH} has fingerprint {actual}, not the study CA's {wanted}; this kit is not from your study"
    return None


def _kit_ca_fingerprint(kit_dir: Path) -> str:
    try:
        return ca_fingerprint((kit_dir / ROOT_CA_PATH).read_bytes())
    except OSError as e:
        raise ConfigError(f"{kit_dir / ROOT_CA_PATH}: cannot read ({e.strerror})") from None


def pin_ca(kit_dir: Path) -> tuple[str | None, str | None]:
    """Compare the kit's CA with the fingerprint pinned in local/ca.sha256, pinning it there first when
    the file does not exist yet. Returns (problem, notice): `problem` is the one-line reason to refuse the
    kit; `notice` the line to show site IT after a fresh pin. Raises ConfigError when the CA is unreadable.
    """
    kit_dir = Path(kit_dir)
    actual = _kit_ca_fingerprint(kit_dir)
    pin = kit_dir / CA_PIN_PATH
    try:
        text = pin.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        try:
            pin.parent.mkdir(exist_ok=True)
            fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CA_PIN_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(actual + "\n")
            os.chmod(pin, CA_PIN_MODE)  # whatever the umask: site IT reads it
        except OSError as e:
            return f"{pin}: cannot pin the study CA ({e.strerror}); make local/ writable, or write lead IT's " \
                   "CA fingerprint there yourself", None
        return None, (f"{pin}: pinned this kit's study CA, SHA-256 fingerprint {actual}; compare it with the "
                      "fingerprint lead IT gave you out of band, and if they differ stop and call lead IT")
    except OSError as e:
        return f"{pin}: cannot read ({e.strerror})", None
    pinned = parse_fingerprint(text)
    if pinned is None:
        return f"{pin}: not a SHA-256 fingerprint; write the study CA's fingerprint from lead IT there " \
               "(64 hex digits, ':' optional), or delete the file to pin this kit's CA on the next start", None
    if pinned != actual:
        return (f"{pin}: this kit's {ROOT_CA_PATH} has fingerprint {actual}, but the pinned study CA is {pinned}; "
                "refusing a kit signed by another CA (ask lead IT for a kit of your study)"), None
    return None, None


# start_check's exit codes: the kit's scripts give each its own fix
KIT_DIFFERS, CA_NOT_PINNED = 1, 3


def start_check(kit_dir: str | Path) -> int:
    """What a kit's start.sh and fl_admin.sh run before anything else, in one interpreter: the signed
    manifest, then the study CA against local/ca.sha256 (pinned on the first start). One line per finding on
    stderr; 0 to go on, KIT_DIFFERS (unzip the kit again) or CA_NOT_PINNED (site IT's pin file: unzipping
    does not touch it)."""
    kit_dir = Path(kit_dir)
    try:
        report = verify_kit(kit_dir)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return KIT_DIFFERS
    for line in report.problems():
        print(f"{kit_dir}/{line}", file=sys.stderr)
    if not report.is_intact:
        return KIT_DIFFERS
    try:
        problem, notice = pin_ca(kit_dir)
    except ConfigError as e:
        problem, notice = str(e), None
    for line in (problem, notice):
        if line is not None:
            print(line, file=sys.stderr)
    return CA_NOT_PINNED if problem is not None else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.kitsig KIT_DIR [--ca PEM] [--ca-fingerprint HEX] [--no-pin]`: print one line per
    problem to stderr; 0 when intact (and, unless --no-pin, its CA matches the pinned one), 1 when not,
    2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m runtime.kitsig", description="Verify a fedkit startup kit.")
    parser.add_argument("kit_dir", type=Path)
    parser.add_argument("--ca", type=Path, help="root CA to trust (default: the kit's startup/rootCA.pem)")
    parser.add_argument("--ca-fingerprint", help="SHA-256 fingerprint the kit's startup/rootCA.pem must have")
    parser.add_argument("--no-pin", action="store_true",
                        help=f"neither read nor write {CA_PIN_PATH} (offline checks of someone else's kit)")
    args = parser.parse_args(argv)
    try:
        ca_pem = args.ca.read_bytes() if args.ca else None
    except OSError as e:
        print(f"{args.ca}: cannot read ({e.strerror})", file=sys.stderr)
        return 2
    try:
        report = verify_kit(args.kit_dir, ca_pem)
        for line in report.problems():
            print(f"{args.kit_dir}/{line}", file=sys.stderr)
        if not report.is_intact:
            return 1
        if args.ca_fingerprint is not None:
            problem = check_ca_fingerprint(args.kit_dir, args.ca_fingerprint)
            if problem is not None:
                print(f"{args.kit_dir}/{problem}", file=sys.stderr)
                return 1
        if not args.no_pin:
            problem, notice = pin_ca(args.kit_dir)
            for line in (problem, notice):
                if line is not None:
                    print(line, file=sys.stderr)
            if problem is not None:
                return 1
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CA_PIN_PATH",
    "FileCheck",
    "FileStatus",
    "KitReport",
    "ca_fingerprint",
    "check_ca_fingerprint",
    "hash_file",
    "is_covered",
    "kit_files",
    "manifest_of_dir",
    "parse_fingerprint",
    "pin_ca",
    "sha256_hex",
    "signature_document",
    "start_check",
    "signed_payload",
    "verify_kit",
]

if __name__ == "__main__":
    sys.exit(main())
