"""Where a study's provisioning output and state live in a workspace, and the ledger of issued certs.

    WORKSPACE/<study>/
      state/rootCA.pem, rootCA.key (0600)   the study CA, created once and reused by every later run
      state/issued.json                     every cert issued (name, kind, serial, run) and every revocation
      state/crl.pem                         the current revocation list
      crl.pem                               the same list, where lead IT picks it up for the server's site
      prod_01/, prod_02/, ...               one folder per run: a kit folder and a zip per participant

Nothing here is a cache: each run reads the ledger from disk and writes it back atomically, holding the
study's lock (`state/.lock`), so two runs at once (two revokes, a revoke during a provision) take turns
instead of each writing back a ledger that lacks the other's certificates or revocations.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from runtime.errors import ConfigError
from runtime.identity import Kind

from ._files import replace_file

STATE_DIR_MODE = 0o700
_PROD_DIR = re.compile(r"prod_(\d{2,})")


def _prod_number(path: Path) -> int:
    return int(path.name.removeprefix("prod_"))


@dataclass(frozen=True)
class StudyWorkspace:
    """Paths of one study inside a workspace folder; computing them touches nothing on disk."""

    root: Path

    @classmethod
    def for_study(cls, workspace: Path, study: str) -> StudyWorkspace:
        return cls(root=Path(workspace) / study)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def ca_cert_path(self) -> Path:
        return self.state_dir / "rootCA.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.state_dir / "rootCA.key"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "issued.json"

    @property
    def crl_path(self) -> Path:
        return self.state_dir / "crl.pem"

    @property
    def published_crl_path(self) -> Path:
        return self.root / "crl.pem"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the study's lock (creating state/, 0700, if needed) while reading and writing its state."""
        self.state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, and by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def prod_dirs(self) -> list[Path]:
        """Existing prod_NN folders, oldest first (by number, not by name, so prod_100 follows prod_99)."""
        if not self.root.is_dir():
            return []
        found = [(_prod_number(p), p) for p in self.root.iterdir() if _PROD_DIR.fullmatch(p.name) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest_prod_dir(self) -> Path | None:
        dirs = self.prod_dirs()
        return dirs[-1] if dirs else None

    def next_prod_dir(self) -> Path:
        latest = self.latest_prod_dir()
        number = _prod_number(latest) + 1 if latest else 1
        return self.root / f"prod_{number:02d}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IssuedCert(_Record):
    """One certificate provisioning handed out. Serials are decimal strings: they exceed JSON-safe ints."""

    name: str
    kind: Kind
    serial: str
    not_after: dt.datetime
    run: str


class Revocation(_Record):
    name: str
    serial: str
    revoked_at: dt.datetime


class Ledger(_Record):
    """state/issued.json: what was issued and what was revoked, so revoke knows every serial of a name."""

    issued: tuple[IssuedCert, ...] = ()
    revoked: tuple[Revocation, ...] = ()

    def serials_of(self, name: str) -> list[str]:
        return [c.serial for c in self.issued if c.name == name]

    def revoked_serials(self) -> set[str]:
        return {r.serial for r in self.revoked}

    def with_issued(self, certs: list[IssuedCert]) -> Ledger:
        return self.model_copy(update={"issued": (*self.issued, *certs)})

    def with_revoked(self, revocations: list[Revocation]) -> Ledger:
        return self.model_copy(update={"revoked": (*self.revoked, *revocations)})


def load_ledger(path: Path) -> Ledger:
    """Read state/issued.json; a missing file is an empty ledger. Raises ConfigError if it is corrupt."""
    if not path.exists():
        return Ledger()
    try:
        return Ledger.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as e:
        raise ConfigError(f"{path}: unreadable ledger ({str(e).splitlines()[0]}); restore it from backup") from None


def save_ledger(path: Path, ledger: Ledger) -> None:
    replace_file(path, (ledger.model_dump_json(indent=2) + "\n").encode())
