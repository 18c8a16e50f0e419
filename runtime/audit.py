"""Tamper-evident audit trail: append-only JSON Lines. Each record carries `hash`, the SHA-256 of its
own canonical JSON (without `hash`), and `prev`, the hash of the record before it. An edited record no
longer matches its own hash; a deleted or inserted one breaks the `prev` link of the record after it.
(Anyone able to rewrite the whole file from a point on can recompute the chain: copy the latest hash
elsewhere, e.g. `show_audit`, to anchor it.)

Never logs secrets: callers pass only names, hashes and arguments a person typed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import AuditChainBroken

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Appends records to one file. Safe to call from several threads; each append is flushed and
    fsynced so a crash loses at most the record being written."""

    def __init__(self, path: Path, clock: Callable[[], str] = _now_iso):
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = self._last_hash()

    def _last_hash(self) -> str:
        """The hash to chain the next record to. A record cut off by a crash mid-write (no final newline)
        is removed first, so the log stays verifiable: that record was never complete."""
        if not self._path.exists() or self._path.stat().st_size == 0:
            return GENESIS
        data = self._path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self._path.open("r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        return json.loads(lines[-1]).get("hash", GENESIS) if lines else GENESIS

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            record = {"time": self._clock(), "event": event, **fields, "prev": self._prev}
            record["hash"] = record_hash(record)
            with self._path.open("ab") as f:
                f.write(_canonical(record) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self._prev = record["hash"]
            return record

    def tail(self, n: int) -> list[dict[str, Any]]:
        if not self._path.exists():
            return []
        lines = [ln for ln in self._path.read_bytes().split(b"\n") if ln.strip()]
        return [json.loads(ln) for ln in lines[-n:]] if n > 0 else []

    @property
    def path(self) -> Path:
        return self._path


@dataclass(frozen=True)
class VerifyReport:
    records: int


def verify(path: Path) -> VerifyReport:
    """Check the whole chain; raise AuditChainBroken naming the first line that does not follow."""
    prev = GENESIS
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise AuditChainBroken(f"{path}:{lineno}: not a JSON record") from None
            if not isinstance(record, dict) or record.get("hash") != record_hash(record):
                raise AuditChainBroken(f"{path}:{lineno}: record was modified (its hash does not match)")
            if record.get("prev") != prev:
                raise AuditChainBroken(
                    f"{path}:{lineno}: chain broken: this record does not follow the one before it "
                    "(a record was deleted or inserted just before this line)")
            prev = record["hash"]
            count += 1
    return VerifyReport(records=count)
