"""Tamper-evident audit trail: append-only JSON Lines. Each record carries `hash`, the SHA-256 of its
own canonical JSON (without `hash`), and `prev`, the hash of the record before it. An edited record no
longer matches its own hash; a deleted or inserted one breaks the `prev` link of the record after it.
(Anyone able to rewrite the whole file from a point on can recompute the chain: copy the latest hash
elsewhere, e.g. `show_audit`, to anchor it. Deleting the last records leaves a chain that verifies:
the head (last hash) and record count, which servers and sites log at every start and stop, are the
anchors `fedkit audit verify --expect-head/--expect-count` checks a log against.)

Never logs secrets: callers pass only names, hashes and arguments a person typed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
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


@dataclass(frozen=True)
class Head:
    """Where a log stands: how many records it holds and the hash of the last (GENESIS when empty)."""

    records: int
    hash: str

    def __str__(self) -> str:
        return f"{self.records} records, head {self.hash}"


class AuditLog:
    """Appends records to one file. Safe to call from several threads; each append is flushed and
    fsynced so a crash loses at most the record being written."""

    def __init__(self, path: Path, clock: Callable[[], str] = _now_iso):
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._prev = self._last_hash()

    def _last_hash(self) -> str:
        """The hash to chain the next record to (and the record count). A record cut off by a crash
        mid-write (no final newline) is removed first, so the log stays verifiable: it was never complete."""
        if not self._path.exists() or self._path.stat().st_size == 0:
            return GENESIS
        data = self._path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self._path.open("r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        self._count = len(lines)
        return json.loads(lines[-1]).get("hash", GENESIS) if lines else GENESIS

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            record = {"time": self._clock(), "event": event, **fields, "prev": self._prev}
            record["hash"] = record_hash(record)
            # 0600 whatever the umask: the trail names jobs, sites and people
            with open(os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as f:
                f.write(_canonical(record) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self._prev = record["hash"]
            self._count += 1
            return record

    def head(self) -> Head:
        """The record count and last hash: log them, so a log later cut at its end can be caught."""
        with self._lock:
            return Head(self._count, self._prev)

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
    last_hash: str = GENESIS  # anchor it elsewhere: a log cut short at its end still verifies


def check_anchors(path: Path, report: VerifyReport, expect_head: str | None, expect_count: int | None) -> None:
    """Raise AuditChainBroken if a verified log does not end where an anchor logged earlier says it did."""
    if expect_count is not None and report.records != expect_count:
        if report.records < expect_count:
            raise AuditChainBroken(f"{path}: {report.records} records, expected {expect_count}: "
                                   f"{expect_count - report.records} record(s) missing (the log was cut)")
        raise AuditChainBroken(f"{path}: {report.records} records, expected {expect_count}: the log grew since "
                               "that count was taken (take the latest count from the server log)")
    if expect_head is not None and report.last_hash != expect_head.strip().lower():
        raise AuditChainBroken(f"{path}: head is {report.last_hash[:16]}..., expected {expect_head[:16]}...: the "
                               "log was cut, rewritten, or grew since that head was taken")


@dataclass(frozen=True)
class _Line:
    lineno: int
    record: dict[str, Any] | None  # None: not a JSON object


def _lines(path: Path) -> Iterator[_Line]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield _Line(lineno, record if isinstance(record, dict) else None)


def verify(path: Path) -> VerifyReport:
    """Check the whole chain; raise AuditChainBroken naming the first line that does not follow, and
    saying what happened there where the neighbours tell (modified, inserted, or a record deleted)."""
    before: _Link | None = None
    prev = _Link(0, GENESIS)
    count = 0
    lines = _lines(path)
    current = next(lines, None)
    while current is not None:
        following = next(lines, None)
        _check_line(path, current, prev, before, following)
        before, prev = prev, _Link(current.lineno, current.record["hash"])  # type: ignore[index]
        count += 1
        current = following
    return VerifyReport(records=count, last_hash=prev.hash)


@dataclass(frozen=True)
class _Link:
    """A good record's line (0: the start of the log) and hash."""

    lineno: int
    hash: str

    def __str__(self) -> str:
        return f"line {self.lineno}" if self.lineno else "the start of the log"


def _check_line(path: Path, line: _Line, prev: _Link, before: _Link | None, following: _Line | None) -> None:
    """Raise AuditChainBroken unless `line` follows `prev`, the last good record (`before` is the one
    before that).

    A record whose successor links to `prev` was inserted; a record that links to `before` means the line
    between was inserted; any other broken link is a deletion (or a rewrite of the record before, with its
    hash recomputed: from the file alone the two look the same)."""
    where = f"{path}:{line.lineno}"
    record = line.record
    if record is None:
        raise AuditChainBroken(f"{where}: not a JSON record")
    next_links_past = following is not None and following.record is not None and \
        following.record.get("prev") == prev.hash
    if record.get("hash") != record_hash(record):
        if next_links_past:
            raise AuditChainBroken(f"{where}: record was inserted (line {following.lineno} follows {prev})")
        raise AuditChainBroken(f"{where}: record was modified (its hash does not match its content)")
    if record.get("prev") == prev.hash:
        return
    if next_links_past:
        raise AuditChainBroken(f"{where}: chain broken: this record was inserted (line {following.lineno} "
                               f"follows {prev})")
    if before is not None and record.get("prev") == before.hash:
        raise AuditChainBroken(f"{where}: chain broken: {prev} was inserted (this record follows {before})")
    if not prev.lineno:
        raise AuditChainBroken(f"{where}: chain broken: the log does not start here (its first records were "
                               "deleted)")
    raise AuditChainBroken(f"{where}: chain broken: this record does not follow {prev} (a record was deleted "
                           f"just before this line, or {prev} was rewritten)")
