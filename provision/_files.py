"""Writing files with the right mode from the first byte, and replacing state files atomically.

A private key must never exist on disk with a looser mode, not even between open() and chmod(), so files
are created with os.open(..., mode) and O_EXCL (never silently overwriting an existing key).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
EXECUTABLE_MODE = 0o755


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` (subject to umask) and write `data`. Raises FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_private_file(path: Path, data: bytes) -> None:
    write_new_file(path, data, PRIVATE_MODE)


def write_public_file(path: Path, data: bytes) -> None:
    write_new_file(path, data, PUBLIC_MODE)


def replace_file(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Replace `path` atomically (temp file beside it, then rename): a crash never leaves half a file. The
    temp name is this call's own, so two writers never write into one temp file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
