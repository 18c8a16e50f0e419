"""A startup kit held in memory: kit-relative path -> bytes, mode and SHA-256.

Kits are assembled in memory first so that signing hashes bytes it already has and zipping never
re-reads the disk; the shared runtime copy is hashed once per run because its KitFile objects are shared
by every kit. Writing to disk is the only I/O here, and it creates each file with its final mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.kitsig import sha256_hex

from ._files import PRIVATE_MODE, PUBLIC_MODE, write_new_file
from .project import ParticipantSpec

DIR_MODE = 0o755


@dataclass(frozen=True)
class KitFile:
    """One file of a kit; build with KitFile.of so the hash always matches the bytes."""

    data: bytes
    mode: int
    sha256: str

    @classmethod
    def of(cls, data: bytes, mode: int = PUBLIC_MODE) -> KitFile:
        return cls(data=data, mode=mode, sha256=sha256_hex(data))


@dataclass
class Kit:
    """One participant's kit while it is being built; `files` grows step by step until it is signed."""

    participant: ParticipantSpec
    files: dict[str, KitFile] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.participant.name

    def add(self, rel_path: str, kit_file: KitFile) -> None:
        """Add a file; a second file at the same path is a provisioning bug, so it raises ValueError."""
        if rel_path in self.files:
            raise ValueError(f"kit '{self.name}': two files at {rel_path}")
        self.files[rel_path] = kit_file

    def total_bytes(self) -> int:
        return sum(len(f.data) for f in self.files.values())


LinkSources = dict[tuple[str, int], Path]


def write_kit(kit: Kit, kit_dir: Path, link_sources: LinkSources | None = None) -> LinkSources:
    """Write every file under `kit_dir` (which must not exist yet), each created with its own mode.

    A file whose (sha256, mode) is in `link_sources` becomes a hard link to that earlier copy instead of a
    new file: the runtime copy is the same in every kit, and on slow file systems creating an inode costs
    far more than linking one (0.2 ms vs 0.01 ms here, x 40 files x 100 kits). Private keys are never
    linked. Returns what this kit wrote, to link later kits against.
    """
    links = link_sources or {}
    written: LinkSources = {}
    kit_dir.mkdir(mode=DIR_MODE)
    made: set[Path] = {kit_dir}
    for rel, kit_file in sorted(kit.files.items()):
        target = kit_dir / rel
        parent = target.parent
        if parent not in made:
            parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            made.add(parent)
        key = (kit_file.sha256, kit_file.mode)
        if kit_file.mode != PRIVATE_MODE and key in links:
            try:
                os.link(links[key], target)
                continue
            except OSError:
                pass  # e.g. a file system without hard links: fall back to a real copy
        write_new_file(target, kit_file.data, kit_file.mode)
        if kit_file.mode != PRIVATE_MODE:
            written[key] = target
    return written
